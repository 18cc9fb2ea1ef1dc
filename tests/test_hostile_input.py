"""Hostile and malformed requests: each is a clear 4xx problem, and nothing is stored."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC

import asyncpg
import httpx
import orjson
import pytest

from jobq.api import create_app
from jobq.settings import Settings
from tests.helpers import NO_JOBS

PROBLEM = "application/problem+json"
JSON_CT = {"content-type": "application/json"}
LIMIT = 64 * 1024
SQLI = "'; DROP TABLE jobs; --"


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    status: int
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON_CT))
    # When set: the problem's `error` slug, text its detail or a field error must contain,
    # and the location of one of its field errors.
    error: str | None = None
    says: str | None = None
    loc: list[str] | None = None


def post(
    name: str,
    body: object,
    status: int = 422,
    *,
    error: str | None = None,
    says: str | None = None,
    loc: list[str] | None = None,
    **headers: str,
) -> Case:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Case(name, "POST", "/jobs", status, raw, {**JSON_CT, **headers}, error, says, loc)


def get(
    name: str,
    path: str,
    status: int = 422,
    *,
    error: str | None = None,
    says: str | None = None,
    loc: list[str] | None = None,
) -> Case:
    return Case(name, "GET", path, status, None, {}, error, says, loc)


def encoded(name: str, body: bytes, status: int, error: str, says: str, **headers: str) -> Case:
    return Case(name, "POST", "/jobs", status, body, headers, error, says)


ECHO = b'{"kind": "echo", "payload": {"n": %s}}'
JOB_ID = "01900000-0000-7000-8000-000000000000"
UPPER_ID = "0190ABCD-0000-7000-8000-00000000000F"  # a UUID, but not as this API writes one


def cursor(created: str, job_id: str = JOB_ID) -> str:
    """A cursor as this API would encode one, around made-up contents."""
    return base64.urlsafe_b64encode(f"{created}|{job_id}".encode()).decode().rstrip("=")


NESTED = b'{"kind": "echo", "payload": {"a": ' + b"[" * 20_000 + b"]" * 20_000 + b"}}"
# Within orjson's depth, beyond what the stdlib reader's recursion reaches: a 500 before.
NESTED_1000 = b'{"kind": "echo", "payload": {"a": ' + b"[" * 1000 + b"]" * 1000 + b"}}"

CASES = [
    # The body itself.
    post("invalid JSON", b'{"kind": "echo",'),
    post("not JSON at all", b"kind=echo"),
    post("empty body", b""),
    Case("text/plain content type", "POST", "/jobs", 415, b'{"kind": "echo"}',
         {"content-type": "text/plain"}),
    Case("form content type", "POST", "/jobs", 415, b"kind=echo",
         {"content-type": "application/x-www-form-urlencoded"}),
    Case("no content type", "POST", "/jobs", 415, b'{"kind": "echo"}', {}),
    post("body over the limit", {"kind": "echo", "payload": {"s": "x" * LIMIT}}, 413),
    post("deeply nested JSON", NESTED),
    post("JSON nested 1000 deep", NESTED_1000),
    Case("a batch nested 1000 deep", "POST", "/jobs/batch", 422,
         b'{"jobs": [' + NESTED_1000 + b"]}", {"content-type": "application/json"}),
    post("body is an array", [{"kind": "echo"}]),
    post("body is a string", "echo"),
    post("body is null", None),
    post("unknown field", {"kind": "echo", "surprise": 1}),
    # Text Postgres cannot store.
    post("NUL in a payload value", b'{"kind": "echo", "payload": {"s": "a\\u0000b"}}'),
    post("NUL in a payload key", b'{"kind": "echo", "payload": {"a\\u0000": 1}}'),
    post("NUL in kind", b'{"kind": "ec\\u0000ho"}'),
    post("NUL in queue", b'{"kind": "echo", "queue": "q\\u0000"}'),
    post("NUL in idempotency_key", b'{"kind": "echo", "idempotency_key": "k\\u0000"}'),
    post("lone surrogate in payload", b'{"kind": "echo", "payload": {"s": "\\ud800"}}'),
    # Payload that is not an object.
    post("payload null", {"kind": "echo", "payload": None}),
    post("payload array", {"kind": "echo", "payload": [1, 2]}),
    post("payload string", {"kind": "echo", "payload": "x"}),
    post("payload number", {"kind": "echo", "payload": 3}),
    # kind and queue.
    post("kind missing", {"payload": {}}),
    post("kind empty", {"kind": ""}),
    post("kind too long", {"kind": "k" * 256}),
    post("kind with a newline", {"kind": "echo\nx"}),
    post("kind with an escape character", {"kind": "echo\x1b[31m"}),
    post("kind not a string", {"kind": 7}),
    post("queue empty", {"kind": "echo", "queue": ""}),
    post("queue with a tab", {"kind": "echo", "queue": "a\tb"}),
    # Numbers.
    post("max_attempts zero", {"kind": "echo", "max_attempts": 0}),
    post("max_attempts negative", {"kind": "echo", "max_attempts": -1}),
    post("max_attempts huge", {"kind": "echo", "max_attempts": 10**30}),
    post("max_attempts as a string", {"kind": "echo", "max_attempts": "3"}),
    post("max_attempts fractional", {"kind": "echo", "max_attempts": 2.5}),
    post("max_attempts boolean", {"kind": "echo", "max_attempts": True}),
    post("priority too high", {"kind": "echo", "priority": 40000}),
    post("priority too low", {"kind": "echo", "priority": -40000}),
    post("priority as a string", {"kind": "echo", "priority": "1"}),
    # run_at.
    post("run_at unparseable", {"kind": "echo", "run_at": "tomorrow-ish"}),
    post("run_at impossible date", {"kind": "echo", "run_at": "2024-13-45T25:61:00Z"}),
    post("run_at empty", {"kind": "echo", "run_at": ""}),
    post("run_at an object", {"kind": "echo", "run_at": {"at": 1}}),
    # Idempotency keys.
    post("Idempotency-Key over 255 characters", {"kind": "echo"},
         **{"Idempotency-Key": "k" * 256}),
    post("Idempotency-Key of 10,000 characters", {"kind": "echo"},
         **{"Idempotency-Key": "k" * 10_000}),
    post("Idempotency-Key not ASCII", {"kind": "echo"}, **{"Idempotency-Key": "caf\u00e9"}),
    post("Idempotency-Key with a control character", {"kind": "echo"},
         **{"Idempotency-Key": "key\x7f"}),
    post("idempotency_key in the body over 255", {"kind": "echo", "idempotency_key": "k" * 256}),
    post("idempotency_key in the body empty", {"kind": "echo", "idempotency_key": ""}),
    # Ids.
    get("non-UUID id", "/jobs/not-a-uuid"),
    get("numeric id", "/jobs/12345"),
    get("SQL in the id", "/jobs/'%20OR%20'1'='1"),
    Case("non-UUID id on cancel", "POST", "/jobs/nope/cancel", 422, None, {}),
    Case("non-UUID id on retry", "POST", "/jobs/nope/retry", 422, None, {}),
    get("unknown job", "/jobs/01900000-0000-7000-8000-000000000000", 404),
    # Listing.
    get("limit not a number", "/jobs?limit=ten"),
    get("limit fractional", "/jobs?limit=1.5"),
    get("offset negative", "/jobs?offset=-1"),
    get("offset huge", f"/jobs?offset={10**30}"),
    get("offset not a number", "/jobs?offset=x"),
    get("unknown status filter", "/jobs?status=exploded"),
    get("SQL in the status filter", "/jobs?status=queued'%20OR%201=1--"),
    get("NUL in the kind filter", "/jobs?kind=a%00b"),
    get("cursor not one of ours", "/jobs?cursor=bm90LWEtY3Vyc29y"),
    get("cursor with foreign characters", "/jobs?cursor=%27%3B--"),
    # Duplicate keys: parsers disagree on which one wins.
    post("duplicate kind", b'{"kind": "echo", "kind": "nosuch"}', error="duplicate_key",
         says="'kind' appears twice"),
    post("duplicate key in the payload", b'{"kind": "echo", "payload": {"a": 1, "a": 2}}',
         error="duplicate_key", says="'a'"),
    post("duplicate key deep in the payload",
         b'{"kind": "echo", "payload": {"x": [{"b": 1, "b": 1}]}}', error="duplicate_key"),
    # Numbers that would come back different.
    post("integer of 2**64", ECHO % b"18446744073709551616", error="number_out_of_range",
         says="64-bit"),
    post("integer below -2**63", ECHO % b"-9223372036854775809", error="number_out_of_range"),
    post("integer of 300 digits", ECHO % (b"1" * 300), error="number_out_of_range"),
    post("integer of 10,000 digits", ECHO % (b"9" * 10_000), error="number_out_of_range"),
    post("decimal that underflows to zero", ECHO % b"1e-400", error="number_out_of_range"),
    post("decimal that overflows to infinity", ECHO % b"1e400", error="number_out_of_range"),
    post("decimal with 20 significant digits", ECHO % b"3.1415926535897932384",
         error="number_out_of_range", says="significant digits"),
    post("NaN", ECHO % b"NaN", error="invalid_json"),
    post("Infinity", ECHO % b"Infinity", error="invalid_json"),
    # Encodings.
    encoded("gzip body", gzip.compress(b'{"kind": "echo"}'), 415, "unsupported_media_type",
            "Content-Encoding", **{**JSON_CT, "content-encoding": "gzip"}),
    encoded("plain body labelled br", b'{"kind": "echo"}', 415, "unsupported_media_type",
            "Content-Encoding", **{**JSON_CT, "content-encoding": "br"}),
    encoded("UTF-16 body", '{"kind": "echo"}'.encode("utf-16"), 415, "unsupported_media_type",
            "charset", **{"content-type": "application/json; charset=utf-16"}),
    encoded("latin-1 charset", b'{"kind": "caf\xe9"}', 415, "unsupported_media_type",
            "charset", **{"content-type": "application/json; charset=ISO-8859-1"}),
    encoded("invalid UTF-8", b'{"kind": "echo",\n "payload": {"s": "\xff"}}', 422,
            "invalid_utf8", "byte 0xff at offset 36 (line 2, column 20)", **JSON_CT),
    # run_at: RFC 3339 with an offset, nothing looser.
    post("run_at without an offset", {"kind": "echo", "run_at": "2030-01-01T00:00:00"},
         loc=["body", "run_at"], says="offset"),
    post("run_at a bare date", {"kind": "echo", "run_at": "2030-01-01"}, loc=["body", "run_at"]),
    post("run_at a Unix time", {"kind": "echo", "run_at": 1_900_000_000}, loc=["body", "run_at"]),
    post("run_at a Unix time as a string", {"kind": "echo", "run_at": "1900000000"},
         loc=["body", "run_at"]),
    post("run_at with a space for T", {"kind": "echo", "run_at": "2030-01-01 00:00:00Z"},
         loc=["body", "run_at"]),
    post("run_at finer than a microsecond",
         {"kind": "echo", "run_at": "2030-01-01T00:00:00.1234567Z"}, loc=["body", "run_at"],
         says="microsecond"),
    post("run_at a leap second", {"kind": "echo", "run_at": "2030-06-30T23:59:60Z"},
         loc=["body", "run_at"]),
    post("run_at offset out of range", {"kind": "echo", "run_at": "2030-01-01T00:00:00+24:00"},
         loc=["body", "run_at"]),
    # Query parameters: each known one at most once.
    get("status given twice", "/jobs?status=queued&status=succeeded",
        loc=["query", "status"], says="more than once"),
    get("limit given twice", "/jobs?limit=1&limit=2", loc=["query", "limit"]),
    get("a parameter in the wrong case", "/jobs?Status=queued", loc=["query", "Status"],
        says="unknown parameter"),
    get("an unknown parameter", "/jobs?include=payload", loc=["query", "include"]),
    get("an unknown parameter on stats", "/stats?window=5", loc=["query", "window"]),
    get("an unknown parameter on a job", "/jobs/01900000-0000-7000-8000-000000000000?x=1",
        loc=["query", "x"]),
    # Paging: a deep offset is refused in favour of the cursor; only our own cursors.
    get("offset over the cap", "/jobs?offset=10001", loc=["query", "offset"], says="cursor"),
    get("cursor at year 1 east of UTC", "/jobs?cursor=" + cursor("0001-01-01T00:00:00+05:00"),
        loc=["query", "cursor"]),
    get("cursor without an offset", "/jobs?cursor=" + cursor("2030-01-01T00:00:00"),
        loc=["query", "cursor"]),
    get("cursor with a bare date", "/jobs?cursor=" + cursor("2030-01-01"),
        loc=["query", "cursor"]),
    get("cursor with a non-UTC offset", "/jobs?cursor=" + cursor("2030-01-01T00:00:00+01:00"),
        loc=["query", "cursor"]),
    get("cursor with an upper-case id",
        "/jobs?cursor=" + cursor("2030-01-01T00:00:00+00:00", UPPER_ID),
        loc=["query", "cursor"]),
    get("cursor with no id", "/jobs?cursor=" + cursor("2030-01-01T00:00:00+00:00", ""),
        loc=["query", "cursor"]),
    get("cursor with extra fields",
        "/jobs?cursor=" + cursor("2030-01-01T00:00:00+00:00", JOB_ID + "|x"),
        loc=["query", "cursor"]),
    get("cursor with a garbage time", "/jobs?cursor=" + cursor("9999-99-99T99:99:99+00:00"),
        loc=["query", "cursor"]),
    # Routes and methods.
    Case("unknown route", "GET", "/jobz", 404, None, {}),
    Case("method not allowed", "DELETE", "/jobs", 405, None, {}),
]  # fmt: skip


@pytest.fixture(scope="module")
async def client(pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(max_payload_bytes=LIMIT), pool=pool)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://jobq.test") as c:
        yield c


@pytest.fixture(scope="module")
async def seeded(pool: asyncpg.Pool) -> str:
    """A few jobs; returns a snapshot of the table that no hostile request may change."""
    await pool.execute(NO_JOBS)
    await pool.execute(
        "INSERT INTO jobs (kind, payload) SELECT 'echo', jsonb_build_object('i', i)"
        " FROM generate_series(1, 5) AS i"
    )
    return await _snapshot(pool)


async def _snapshot(pool: asyncpg.Pool) -> str:
    rows = await pool.fetch("SELECT * FROM jobs ORDER BY id")
    return repr([tuple(r.values()) for r in rows])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_hostile_request_is_a_clear_4xx_problem_and_stores_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, seeded: str, case: Case
) -> None:
    headers = {k: v.encode("latin-1") for k, v in case.headers.items()}
    response = await client.request(case.method, case.path, content=case.body, headers=headers)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == case.status
    assert {"type", "title", "detail", "error"} <= problem.keys()
    assert "Traceback" not in response.text
    if case.error is not None:
        assert problem["error"] == case.error, problem
    if case.says is not None:
        said = [problem["detail"], *(e["msg"] for e in problem.get("errors") or [])]
        assert any(case.says in text for text in said), problem
    if case.loc is not None:
        assert case.loc in [e["loc"] for e in problem["errors"]], problem
    assert await _snapshot(pool) == seeded


async def test_a_chunked_body_over_the_limit_is_413(
    client: httpx.AsyncClient, pool: asyncpg.Pool, seeded: str
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"kind": "echo", "payload": {"s": "'
        for _ in range(LIMIT // 1024 + 1):
            yield b"x" * 1024
        yield b'"}}'

    response = await client.post("/jobs", content=chunks(), headers=JSON_CT)
    assert response.status_code == 413
    assert response.headers["content-type"] == PROBLEM
    assert await _snapshot(pool) == seeded


@pytest.mark.parametrize(("asked", "got"), [("-5", 1), ("0", 1), (str(10**30), 200)])
async def test_out_of_range_integer_limits_are_clamped(
    client: httpx.AsyncClient, seeded: str, asked: str, got: int
) -> None:
    response = await client.get(f"/jobs?limit={asked}")
    assert response.status_code == 200
    assert response.json()["limit"] == got


@pytest.mark.parametrize(
    "where",
    ["kind", "queue", "payload key", "payload value", "idempotency key"],
)
async def test_sql_looking_strings_are_stored_verbatim_and_never_executed(
    client: httpx.AsyncClient, pool: asyncpg.Pool, where: str
) -> None:
    await pool.execute(NO_JOBS)
    body: dict[str, object] = {"kind": "echo"}
    headers = dict(JSON_CT)
    if where == "kind":
        body["kind"] = SQLI
    elif where == "queue":
        body["queue"] = SQLI
    elif where == "payload key":
        body["payload"] = {SQLI: 1}
    elif where == "payload value":
        body["payload"] = {"v": SQLI}
    else:
        headers["Idempotency-Key"] = SQLI
    created = await client.post("/jobs", content=orjson.dumps(body), headers=headers)
    assert created.status_code == 201, created.text
    job = (await client.get(f"/jobs/{created.json()['id']}")).json()
    assert job["kind"] == body["kind"]
    assert job["queue"] == body.get("queue", "default")
    assert job["payload"] == body.get("payload", {})
    assert job["idempotency_key"] == headers.get("Idempotency-Key")
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 1


async def test_sql_looking_list_filters_match_only_literally(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await pool.execute(NO_JOBS)
    await client.post("/jobs", json={"kind": "echo"})
    for param in ("kind", "queue"):
        response = await client.get("/jobs", params={param: "x' OR '1'='1"})
        assert response.status_code == 200
        assert response.json()["jobs"] == []
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 1


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        (b"18446744073709551615", 2**64 - 1),
        (b"-9223372036854775808", -(2**63)),
        (b"0.1", 0.1),
        (b"1e300", 1e300),
        (b"5e-324", 5e-324),
        (b"0.10000000000000001", 0.1),  # 17 digits: the same double as 0.1
    ],
)
async def test_numbers_a_64_bit_integer_or_float_holds_are_stored_exactly(
    client: httpx.AsyncClient, pool: asyncpg.Pool, sent: bytes, stored: object
) -> None:
    await pool.execute(NO_JOBS)
    created = await client.post("/jobs", content=ECHO % sent, headers=JSON_CT)
    assert created.status_code == 201, created.text
    job = (await client.get(f"/jobs/{created.json()['id']}")).json()
    assert job["payload"]["n"] == stored
    assert type(job["payload"]["n"]) is type(stored)


@pytest.mark.parametrize(
    ("sent", "instant"),
    [
        ("2030-01-01T09:00:00Z", "2030-01-01T09:00:00+00:00"),
        ("2030-01-01t09:00:00z", "2030-01-01T09:00:00+00:00"),
        ("2030-01-01T14:30:00.5+05:30", "2030-01-01T09:00:00.500000+00:00"),
        ("2030-01-01T09:00:00.123000000-00:00", "2030-01-01T09:00:00.123000+00:00"),
    ],
)
async def test_rfc_3339_run_at_with_an_offset_is_the_instant_it_names(
    client: httpx.AsyncClient, pool: asyncpg.Pool, sent: str, instant: str
) -> None:
    await pool.execute(NO_JOBS)
    created = await client.post("/jobs", json={"kind": "echo", "run_at": sent})
    assert created.status_code == 201, created.text
    stored = await pool.fetchval("SELECT run_at FROM jobs")
    assert stored.astimezone(UTC).isoformat() == instant


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "application/json; charset=\"UTF-8\"",
     "application/json;charset=utf-8"],
)  # fmt: skip
async def test_a_utf_8_charset_parameter_is_accepted(
    client: httpx.AsyncClient, pool: asyncpg.Pool, content_type: str
) -> None:
    await pool.execute(NO_JOBS)
    created = await client.post(
        "/jobs", content=b'{"kind": "echo"}', headers={"content-type": content_type}
    )
    assert created.status_code == 201, created.text


async def test_identity_content_encoding_is_accepted(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await pool.execute(NO_JOBS)
    created = await client.post(
        "/jobs", content=b'{"kind": "echo"}', headers={**JSON_CT, "content-encoding": "identity"}
    )
    assert created.status_code == 201, created.text


async def test_a_cursor_this_api_issued_pages_on(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await pool.execute(NO_JOBS)
    for _ in range(3):
        await client.post("/jobs", json={"kind": "echo"})
    first = (await client.get("/jobs?limit=2")).json()
    rest = (await client.get("/jobs", params={"cursor": first["next_cursor"]})).json()
    assert len(first["jobs"]) == 2
    assert len(rest["jobs"]) == 1


async def test_the_deepest_allowed_offset_is_served(client: httpx.AsyncClient) -> None:
    response = await client.get("/jobs?offset=10000")
    assert response.status_code == 200
