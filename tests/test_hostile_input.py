"""Hostile and malformed requests: each is a clear 4xx problem, and nothing is stored."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import httpx
import orjson
import pytest

from jobq.api import create_app
from jobq.settings import Settings

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


def post(name: str, body: object, status: int = 422, **headers: str) -> Case:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Case(name, "POST", "/jobs", status, raw, {**JSON_CT, **headers})


def get(name: str, path: str, status: int = 422) -> Case:
    return Case(name, "GET", path, status, None, {})


NESTED = b'{"kind": "echo", "payload": {"a": ' + b"[" * 20_000 + b"]" * 20_000 + b"}}"

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
    await pool.execute("TRUNCATE jobs")
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
    await pool.execute("TRUNCATE jobs")
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
    await pool.execute("TRUNCATE jobs")
    await client.post("/jobs", json={"kind": "echo"})
    for param in ("kind", "queue"):
        response = await client.get("/jobs", params={param: "x' OR '1'='1"})
        assert response.status_code == 200
        assert response.json()["jobs"] == []
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 1
