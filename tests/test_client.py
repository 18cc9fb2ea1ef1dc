"""The typed Python client (`jobq.Client`, `jobq.AsyncClient`) against real `jobq api`
processes: one over this module's database, with a token; one over a database that is down."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.server
import math
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from jobq.api import create_app, schemas
from jobq.client import AsyncClient, Client, NewJob, RetryPolicy, errors, models
from jobq.queue import Job, Queue, lease_of
from jobq.queue import NewJob as QueueNewJob
from jobq.settings import Settings
from tests.helpers import ROOT, wait_for
from tests.servers import free_port, start_api, stop, wait_ready

TOKEN = "client-test-token"
FAST_RETRIES = {"retries": 2, "backoff": 0.01, "max_backoff": 0.02}


@pytest.fixture(scope="module")
def api(dsn: str) -> Iterator[str]:
    proc, base = start_api(
        dsn,
        "--app",
        "jobq.examples:registry",
        env={"JOBQ_API_TOKENS": TOKEN},
        stdin=subprocess.DEVNULL,
    )
    try:
        asyncio.run(wait_ready(base, proc))
        yield base
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def down_api() -> Iterator[str]:
    """An API whose database is unreachable: every job route answers 503 with Retry-After."""
    proc, base = start_api(
        f"postgresql://postgres@127.0.0.1:{free_port()}/none", stdin=subprocess.DEVNULL
    )

    async def alive() -> bool:
        assert proc.poll() is None, "the API server exited"
        try:
            async with httpx.AsyncClient() as c:
                return (await c.get(f"{base}/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    try:
        asyncio.run(wait_for(alive, timeout=30, interval=0.1))
        yield base
    finally:
        stop(proc)


@pytest.fixture
def client(api: str, queue: Queue) -> Iterator[Client]:
    with Client(api, token=TOKEN) as c:
        yield c


class Counting:
    """An httpx client of the test's own that counts the requests it sends."""

    def __init__(self, base: str) -> None:
        self.sent: list[str] = []
        self.http = httpx.Client(
            base_url=base, event_hooks={"request": [lambda r: self.sent.append(r.method)]}
        )

    def __enter__(self) -> Client:
        return Client(http=self.http, **FAST_RETRIES)  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        self.http.close()


# -- calls and what they return ------------------------------------------------------------


def test_enqueue_returns_the_stored_job_as_typed_values(client: Client) -> None:
    run_at = datetime(2030, 1, 1, 9, tzinfo=UTC)
    stored = client.enqueue(
        "echo", {"n": 1}, queue="mail", priority=-3, run_at=run_at, concurrency_key="tenant-7"
    )
    job = stored.job
    assert stored.created
    assert isinstance(job.id, uuid.UUID)
    assert (job.kind, job.queue, job.priority, job.payload) == ("echo", "mail", -3, {"n": 1})
    assert job.concurrency_key == "tenant-7"
    assert (job.status, job.run_at, job.is_terminal) == ("queued", run_at, False)
    assert job.created_at.tzinfo is not None


def test_enqueue_with_an_idempotency_key_returns_the_same_job_again(client: Client) -> None:
    first = client.enqueue("echo", {"n": 1}, idempotency_key="order-42")
    again = client.enqueue("echo", {"n": 1}, idempotency_key="order-42")
    assert (first.created, again.created) == (True, False)
    assert again.job.id == first.job.id
    assert again.job.idempotency_key == "order-42"


def test_enqueue_of_a_unique_job_returns_the_existing_one_for_a_duplicate(
    client: Client,
) -> None:
    first = client.enqueue("echo", {"account": 7, "n": 1}, unique_for=timedelta(minutes=5),
                           unique_by=["account"])  # fmt: skip
    again = client.enqueue("echo", {"account": 7, "n": 2}, unique_for=300, unique_by=["account"])
    assert (first.created, again.created) == (True, False)
    assert again.job.id == first.job.id


def test_get_returns_the_whole_job(client: Client) -> None:
    created = client.enqueue("echo", {"hello": "world"}).job
    job = client.get(created.id)
    assert job == created
    assert (job.result, job.errors, job.last_error) == (None, [], None)


def test_list_jobs_iterates_every_page_by_cursor_newest_first(client: Client) -> None:
    ids = [client.enqueue("echo", {"i": i}).job.id for i in range(7)]
    listed = list(client.list_jobs(kind="echo", page_size=3))
    assert [j.id for j in listed] == ids[::-1]
    assert all(isinstance(j, models.JobSummary) for j in listed)


def test_list_page_returns_one_page_and_its_cursor(client: Client) -> None:
    for i in range(3):
        client.enqueue("echo", {"i": i})
    page = client.list_page(limit=2)
    assert (len(page.jobs), page.limit) == (2, 2)
    rest = client.list_page(limit=2, cursor=page.next_cursor)
    assert len(rest.jobs) == 1


def test_cancel_cancels_a_waiting_job(client: Client) -> None:
    job = client.enqueue("echo").job
    assert client.cancel(job.id) == models.Cancelled("cancelled", job.id)
    assert client.get(job.id).status == "cancelled"


def test_retry_queues_a_cancelled_job_again(client: Client) -> None:
    job = client.enqueue("echo").job
    client.cancel(job.id)
    assert client.retry(job.id).status == "queued"


async def test_the_async_client_does_the_same_awaited(api: str, queue: Queue) -> None:
    async with AsyncClient(api, token=TOKEN) as client:
        stored = await client.enqueue("echo", {"n": 2}, idempotency_key="async-1")
        assert (await client.get(stored.job.id)).payload == {"n": 2}
        assert [j.id async for j in client.list_jobs(page_size=1)] == [stored.job.id]
        assert (await client.cancel(stored.job.id)).status == "cancelled"
        assert (await client.retry(stored.job.id)).status == "queued"
        with pytest.raises(errors.NotFound):
            await client.get(uuid.uuid4())


# -- problem documents as typed exceptions --------------------------------------------------


def test_a_missing_job_raises_not_found_with_the_problem_fields(client: Client) -> None:
    missing = uuid.uuid4()
    with pytest.raises(errors.NotFound) as caught:
        client.get(missing)
    problem = caught.value
    assert (problem.status, problem.error, problem.type) == (
        404, "not_found", "urn:jobq:problem:not-found",
    )  # fmt: skip
    assert str(missing) in problem.detail
    assert isinstance(problem, errors.APIError)


def test_an_invalid_job_raises_validation_error_naming_the_field(client: Client) -> None:
    with pytest.raises(errors.ValidationError) as caught:
        client.enqueue("echo", priority=1 << 20)
    assert caught.value.status == 422
    assert [e["loc"] for e in caught.value.errors] == [["body", "priority"]]


def test_an_unknown_kind_raises_unknown_kind(client: Client) -> None:
    with pytest.raises(errors.UnknownKind):
        client.enqueue("no.such.kind")


def test_a_payload_that_does_not_fit_raises_invalid_payload(client: Client) -> None:
    with pytest.raises(errors.InvalidPayload):
        client.enqueue("sleep", {"seconds": "long"})


def test_a_key_reused_for_another_request_raises_idempotency_key_reused(client: Client) -> None:
    first = client.enqueue("echo", {"n": 1}, idempotency_key="k").job
    with pytest.raises(errors.IdempotencyKeyReused) as caught:
        client.enqueue("echo", {"n": 2}, idempotency_key="k")
    assert caught.value.job_id == str(first.id)


def test_cancelling_a_job_that_ended_raises_job_terminal_with_its_state(client: Client) -> None:
    job = client.enqueue("echo").job
    client.cancel(job.id)
    with pytest.raises(errors.JobTerminal) as caught:
        client.cancel(job.id)
    assert (caught.value.status, caught.value.job_status) == (409, "cancelled")


def test_retrying_a_waiting_job_raises_invalid_state(client: Client) -> None:
    job = client.enqueue("echo").job
    with pytest.raises(errors.InvalidState):
        client.retry(job.id)


def test_a_missing_or_wrong_token_raises_unauthorized(api: str, queue: Queue) -> None:
    for token in (None, "wrong"):
        with Client(api, token=token) as anonymous, pytest.raises(errors.Unauthorized):
            anonymous.get(uuid.uuid4())


# -- local input the client cannot send: InvalidRequest, before anything is sent -------------


def test_an_id_that_is_not_a_uuid_raises_invalid_request_before_anything_is_sent(
    api: str,
) -> None:
    counting = Counting(api)
    with counting as client:
        for call in (client.get, client.cancel, client.retry, client.wait):
            with pytest.raises(errors.InvalidRequest):
                call("../metrics")
    assert counting.sent == []


@pytest.mark.parametrize(
    "payload", [{"at": {1, 2}}, {"x": math.nan}, {"s": "\ud800"}, ["not", "a", "mapping"]],
    ids=["a set", "NaN", "a lone surrogate", "a list"],
)  # fmt: skip
def test_a_payload_that_is_not_a_json_object_raises_invalid_request_before_anything_is_sent(
    api: str, payload: Any
) -> None:
    counting = Counting(api)
    with counting as client:
        with pytest.raises(errors.InvalidRequest):
            client.enqueue("echo", payload)
        with pytest.raises(errors.InvalidRequest):
            client.enqueue_batch([NewJob("echo"), NewJob("echo", payload)])
    assert counting.sent == []


@pytest.mark.parametrize("key", ["schl\u00fcssel", "two\nlines", " padded "])
def test_an_idempotency_key_that_cannot_be_a_header_raises_invalid_request_before_sending(
    api: str, key: str
) -> None:
    counting = Counting(api)
    with counting as client, pytest.raises(errors.InvalidRequest):
        client.enqueue("echo", idempotency_key=key)
    assert counting.sent == []


@pytest.mark.parametrize("token", ["t\u00f6ken", "two\nlines", ""])
def test_a_token_that_cannot_be_a_header_raises_invalid_request_without_showing_it(
    api: str, token: str
) -> None:
    with pytest.raises(errors.InvalidRequest) as caught:
        Client(api, token=token)
    assert not token or token not in str(caught.value)


@pytest.mark.parametrize(
    "headers", [{"X-Tenant": "caf\u00e9"}, {"X-Tenant": "a\r\nX-Admin: 1"}, {"Bad Name": "x"}],
    ids=["not ASCII", "a line break", "a space in the name"],
)  # fmt: skip
def test_a_header_that_cannot_be_sent_raises_invalid_request(
    api: str, headers: dict[str, str]
) -> None:
    with pytest.raises(errors.InvalidRequest):
        Client(api, headers=headers)


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -1.0])
def test_wait_with_a_timeout_that_is_not_finite_and_at_least_zero_raises_invalid_request(
    api: str, timeout: float
) -> None:
    counting = Counting(api)
    with counting as client, pytest.raises(errors.InvalidRequest):
        client.wait(uuid.uuid4(), timeout=timeout)
    assert counting.sent == []


@pytest.mark.parametrize(
    "settings", [{"timeout": math.nan}, {"timeout": 0}, {"max_wait": math.inf},
                 {"max_wait": 0}, {"backoff": math.nan}, {"max_backoff": -1}, {"retries": 1.5}],
    ids=str,
)  # fmt: skip
def test_client_settings_that_are_not_usable_numbers_raise_invalid_request(
    api: str, settings: dict[str, Any]
) -> None:
    with pytest.raises(errors.InvalidRequest):
        Client(api, **settings)


async def test_the_async_client_raises_invalid_request_for_the_same_input(api: str) -> None:
    with pytest.raises(errors.InvalidRequest):
        AsyncClient(api, token="t\u00f6ken")
    async with AsyncClient(api, token=TOKEN, retries=0) as client:
        with pytest.raises(errors.InvalidRequest):
            await client.get("../metrics")
        with pytest.raises(errors.InvalidRequest):
            await client.enqueue("echo", {"x": math.nan})
        with pytest.raises(errors.InvalidRequest):
            await client.wait(uuid.uuid4(), timeout=math.nan)


def test_a_batch_of_the_queue_core_s_new_jobs_raises_invalid_request_naming_the_right_one(
    client: Client,
) -> None:
    with pytest.raises(errors.InvalidRequest, match=r"jobq\.client\.NewJob"):
        client.enqueue_batch([QueueNewJob("echo")])  # type: ignore[list-item]


def test_invalid_request_is_a_client_error_and_a_value_error() -> None:
    assert issubclass(errors.InvalidRequest, errors.ClientError)
    assert issubclass(errors.InvalidRequest, ValueError)


# -- retries ---------------------------------------------------------------------------------


@contextlib.contextmanager
def answering(status: int, body: bytes, ctype: str = "text/html") -> Iterator[str]:
    """A server of the test's own, standing in for a proxy before the API: every request gets
    `status` with `body`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [502, 504])
def test_a_get_is_retried_when_a_gateway_answers_502_or_504(status: int) -> None:
    with answering(status, b"<html>bad gateway</html>") as base:
        counting = Counting(base)
        with counting as client, pytest.raises(errors.UnexpectedResponse):
            client.get(uuid.uuid4())
    assert counting.sent == ["GET"] * 3


def test_an_enqueue_without_a_key_is_not_retried_when_a_gateway_answers_502() -> None:
    # The request may have reached the API: sending it again could enqueue it twice.
    with answering(502, b"<html>bad gateway</html>") as base:
        counting = Counting(base)
        with counting as client, pytest.raises(errors.UnexpectedResponse):
            client.enqueue("echo")
    assert counting.sent == ["POST"]


def test_a_success_whose_body_is_not_a_job_raises_unexpected_response() -> None:
    with answering(200, b'{"id": 5}', "application/json") as base:
        counting = Counting(base)
        with counting as client, pytest.raises(errors.UnexpectedResponse):
            client.get(uuid.uuid4())


def test_a_get_is_retried_on_503_then_raises_database_unavailable(down_api: str) -> None:
    counting = Counting(down_api)
    with counting as client, pytest.raises(errors.DatabaseUnavailable) as caught:
        client.get(uuid.uuid4())
    assert counting.sent == ["GET"] * 3
    assert isinstance(caught.value, errors.Unavailable) and caught.value.status == 503


def test_an_enqueue_without_a_key_is_never_retried(down_api: str) -> None:
    counting = Counting(down_api)
    with counting as client, pytest.raises(errors.DatabaseUnavailable):
        client.enqueue("echo")
    assert counting.sent == ["POST"]


def test_an_enqueue_with_a_key_is_retried_on_503(down_api: str) -> None:
    counting = Counting(down_api)
    with counting as client, pytest.raises(errors.DatabaseUnavailable):
        client.enqueue("echo", idempotency_key="safe-to-repeat")
    assert counting.sent == ["POST"] * 3


def test_cancel_and_retry_are_never_retried(down_api: str) -> None:
    counting = Counting(down_api)
    with counting as client:
        for call in (client.cancel, client.retry):
            with pytest.raises(errors.DatabaseUnavailable):
                call(uuid.uuid4())
    assert counting.sent == ["POST", "POST"]


def _problem(status: int, error: str) -> httpx.Response:
    body = {"type": f"urn:jobq:problem:{error}", "title": "", "status": status, "detail": "",
            "error": error}  # fmt: skip
    return httpx.Response(status, json=body, headers={"Content-Type": "application/problem+json"})


def test_a_post_the_api_refused_before_carrying_it_out_is_retried_without_a_key() -> None:
    job_id = uuid.uuid4()
    answers = iter([
        _problem(503, "too_many_connections"),  # refused before the request was read
        _problem(503, "database_read_only"),  # the write refused: nothing changed
        httpx.Response(200, json={"status": "cancelled", "job_id": str(job_id)}),
    ])  # fmt: skip
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.method)
        return next(answers)

    with httpx.Client(transport=httpx.MockTransport(answer), base_url="http://test") as http:
        client = Client(http=http, **FAST_RETRIES)  # type: ignore[arg-type]
        assert client.cancel(job_id).status == "cancelled"
    assert sent == ["POST"] * 3


def test_no_answer_is_retried_for_a_get_then_raises_transport_error() -> None:
    counting = Counting(f"http://127.0.0.1:{free_port()}")
    with counting as client:
        with pytest.raises(errors.TransportError) as caught:
            client.get(uuid.uuid4())
        with pytest.raises(errors.TransportError):
            client.enqueue("echo")
    assert counting.sent == ["GET", "GET", "GET", "POST"]
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_wait_sleeps_for_no_retry_past_its_timeout(down_api: str) -> None:
    started = time.monotonic()
    # The API's 503s say Retry-After: 2; five of them would take 10 s.
    with Client(down_api, retries=5) as client, pytest.raises(errors.DatabaseUnavailable):
        client.wait(uuid.uuid4(), timeout=0.2)
    assert time.monotonic() - started < 2


def test_retry_after_is_honoured_up_to_max_backoff() -> None:
    policy = RetryPolicy(retries=3, backoff=0.01, max_backoff=5)
    assert policy.delay(0, httpx.Response(503, headers={"Retry-After": "2"})) == 2
    assert policy.delay(0, httpx.Response(503, headers={"Retry-After": "120"})) == 5
    soon = (datetime.now(UTC) + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert policy.delay(0, httpx.Response(503, headers={"Retry-After": soon})) == 5
    assert 0 <= policy.delay(4, httpx.Response(503)) <= 0.16


# -- batch -------------------------------------------------------------------------------


def test_enqueue_batch_stores_every_job_in_order_and_says_which_it_created(
    client: Client,
) -> None:
    before = client.enqueue("echo", {"n": 0}, idempotency_key="batch-0").job
    stored = client.enqueue_batch(
        [NewJob("echo", {"n": 0}, idempotency_key="batch-0"), NewJob("echo", {"n": 1}),
         NewJob("sleep", {"seconds": 1}, queue="slow", priority=3)]
    )  # fmt: skip
    assert [s.created for s in stored] == [False, True, True]
    assert stored[0].job.id == before.id
    assert [(s.job.kind, s.job.queue) for s in stored] == [
        ("echo", "default"), ("echo", "default"), ("sleep", "slow"),
    ]  # fmt: skip


def test_an_invalid_job_in_a_batch_raises_validation_error_and_stores_nothing(
    client: Client,
) -> None:
    with pytest.raises(errors.ValidationError) as caught:
        client.enqueue_batch([NewJob("echo"), NewJob("echo", priority=1 << 20)])
    assert [e["loc"] for e in caught.value.errors] == [["body", "jobs", 1, "priority"]]
    assert list(client.list_jobs()) == []


def test_a_batch_is_retried_on_503_only_when_every_job_has_a_key(down_api: str) -> None:
    counting = Counting(down_api)
    with counting as client:
        for jobs in ([NewJob("echo", idempotency_key="a"), NewJob("echo", idempotency_key="b")],
                     [NewJob("echo", idempotency_key="a"), NewJob("echo")]):  # fmt: skip
            with pytest.raises(errors.DatabaseUnavailable):
                client.enqueue_batch(jobs)
    assert counting.sent == ["POST"] * 3 + ["POST"]


# -- wait --------------------------------------------------------------------------------


async def test_wait_returns_as_soon_as_the_job_ends(api: str, queue: Queue) -> None:
    async with AsyncClient(api, token=TOKEN) as client:
        job = (await client.enqueue("echo", {"n": 1})).job
        waiting = asyncio.create_task(client.wait(job.id, timeout=30))

        async def claim() -> list[Job]:
            # Skips the row while the waiter's mark (an UPDATE) holds it: claimed again.
            return await queue.claim("w", ["echo"], ["default"], 1, lease_seconds=30)

        (claimed,) = await wait_for(claim, timeout=10)
        await asyncio.sleep(0.2)  # the waiter is waiting now (or answers at once if not)
        assert await queue.complete(lease_of(claimed), {"n": 1})
        done = await asyncio.wait_for(waiting, 10)  # long before its 30 s
    assert (done.status, done.result, done.is_terminal) == ("succeeded", {"n": 1}, True)


async def test_wait_keeps_each_request_within_the_apis_wait_bound(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    # JOBQ_WAIT_MAX_SECONDS lower than the client's max_wait (60 s): the API says so, the
    # client asks for no more.
    app = create_app(Settings(wait_max_seconds=0.2), pool=pool)
    job = (await queue.enqueue(QueueNewJob("echo"))).job
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        client = AsyncClient(http=http, **FAST_RETRIES)  # type: ignore[arg-type]
        assert (await client.wait(job.id, timeout=0.5)).status == "queued"
        assert client.max_wait == 0.2


def test_wait_returns_the_job_as_it_is_when_the_time_is_up(client: Client) -> None:
    job = client.enqueue("echo").job
    started = time.monotonic()
    assert client.wait(job.id, timeout=0.3).status == "queued"
    assert time.monotonic() - started < 5


# -- the package -----------------------------------------------------------------------------


def test_the_models_have_the_fields_of_the_api_schemas() -> None:
    pairs = [(models.Job, schemas.JobOut), (models.JobSummary, schemas.JobSummaryOut),
             (models.Page, schemas.JobPage), (models.Cancelled, schemas.CancelOut),
             (models.JobError, schemas.JobError)]  # fmt: skip
    for model, schema in pairs:
        assert [f.name for f in dataclasses.fields(model)] == list(schema.model_fields), model
    new_job = {f.name for f in dataclasses.fields(NewJob)}
    assert new_job == set(schemas.JobCreate.model_fields)


def test_the_client_imports_without_the_servers_packages() -> None:
    server_side = ["asyncpg", "fastapi", "starlette", "pydantic", "uvicorn", "orjson", "jinja2"]
    code = (
        f"import sys\nfor m in {server_side!r}: sys.modules[m] = None\n"
        "from jobq import AsyncClient, Client\nfrom jobq.client import errors, models\n"
        "print(sorted(m for m in sys.modules if m.startswith('jobq')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert "jobq.queue" not in out.stdout and "jobq.client" in out.stdout
