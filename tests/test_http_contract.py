"""HTTP details a client relies on: HEAD, redirects, header whitespace, disconnects, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from jobq import metrics
from jobq.api import create_app
from jobq.examples import registry as examples
from jobq.queue import NewJob, Queue
from jobq.registry import JobContext, Registry
from jobq.settings import Settings
from jobq.worker import Worker
from tests.helpers import wait_for


def make_client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),  # type: ignore[arg-type]
        base_url="http://jobq.test",
    )


@pytest.fixture
async def client(queue: Queue, pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(create_app(Settings(), pool=pool)) as c:
        yield c


# -- HEAD --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/jobs", "/jobs/{id}", "/stats", "/healthz", "/readyz", "/metrics", "/openapi.json"]
)
async def test_head_answers_like_get_without_a_body_on_every_get_route(
    client: httpx.AsyncClient, path: str
) -> None:
    created = await client.post("/jobs", json={"kind": "echo"})
    path = path.replace("{id}", created.json()["id"])
    got = await client.get(path)
    head = await client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert "x-request-id" in head.headers
    if path not in {"/metrics", "/stats"}:  # both carry the time they were generated
        assert head.headers["content-length"] == got.headers["content-length"]


async def test_method_not_allowed_lists_head_where_get_is_allowed(
    client: httpx.AsyncClient,
) -> None:
    response = await client.delete("/jobs")
    assert response.status_code == 405
    assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD", "POST"}


async def test_head_on_a_post_only_route_is_405(client: httpx.AsyncClient) -> None:
    response = await client.head("/jobs/01900000-0000-7000-8000-000000000000/cancel")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


# -- redirects ---------------------------------------------------------------------------


async def test_the_trailing_slash_redirect_never_points_at_the_clients_host_header(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/jobs/?limit=5", headers={"host": "evil.example"})
    assert response.status_code == 307
    assert response.headers["location"] == "/jobs?limit=5"


@pytest.mark.parametrize("path", ["//evil.example/", "/\\evil.example/", "//evil.example/jobs/"])
async def test_no_path_redirects_off_site(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get("http://jobq.test" + path)
    assert response.request.url.path == path
    assert response.status_code == 404
    assert "location" not in response.headers


# -- Idempotency-Key whitespace ----------------------------------------------------------


@pytest.mark.parametrize("sent", ["  order-7", "order-7  ", "\torder-7\t", ' "order-7" '])
async def test_idempotency_key_whitespace_is_trimmed_on_both_sides(
    client: httpx.AsyncClient, sent: str
) -> None:
    key = {"Idempotency-Key": "order-7"}
    first = await client.post("/jobs", json={"kind": "echo"}, headers=key)
    again = await client.post("/jobs", json={"kind": "echo"}, headers={"Idempotency-Key": sent})
    assert first.status_code == 201
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["idempotency_key"] == "order-7"


# -- metrics -----------------------------------------------------------------------------


def _series(text: str, name: str) -> list[dict[str, str]]:
    return [
        s.labels
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


async def test_enqueueing_many_distinct_kinds_without_a_registry_keeps_metrics_bounded(
    client: httpx.AsyncClient,
) -> None:
    async def enqueued_kinds() -> set[str]:
        text = (await client.get("/metrics")).text
        return {s["kind"] for s in _series(text, "jobq_jobs_enqueued_total")}

    before = await enqueued_kinds()
    for i in range(metrics.MAX_LABEL_VALUES + 20):
        response = await client.post("/jobs", json={"kind": f"flood-{i}"})
        assert response.status_code == 201
    after = await enqueued_kinds()
    assert len(after - before) <= metrics.MAX_LABEL_VALUES + 1
    assert metrics.OTHER in after
    for i in range(50):
        await client.post("/jobs", json={"kind": f"more-flood-{i}"})
    assert await enqueued_kinds() == after


async def test_kinds_a_registry_knows_are_labelled_and_nothing_else(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    async with make_client(create_app(Settings(), pool=pool, registry=examples)) as c:
        assert metrics.kind_label("echo", examples) == "echo"
        assert metrics.kind_label("never-registered", examples) == metrics.OTHER
        await c.post("/jobs", json={"kind": "echo"})
        text = (await c.get("/metrics")).text
    assert {"kind": "echo"} in _series(text, "jobq_jobs_enqueued_total")


async def test_invented_http_methods_do_not_create_metric_series(
    client: httpx.AsyncClient,
) -> None:
    for i in range(30):
        await client.request(f"BREW{i}", "/jobs")
    text = (await client.get("/metrics")).text
    methods = {s["method"] for s in _series(text, "jobq_http_requests_total")}
    assert not any(m.startswith("BREW") for m in methods)
    assert metrics.OTHER in methods


async def test_jobs_in_many_queues_export_a_bounded_number_of_queue_series(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await pool.execute(
        "INSERT INTO jobs (kind, queue) SELECT 'echo', 'q-' || i FROM generate_series(1, $1) i",
        metrics.MAX_LABEL_VALUES + 30,
    )
    text = (await client.get("/metrics")).text
    series = _series(text, "jobq_jobs")
    queues = {s["queue"] for s in series}
    assert len(queues) <= metrics.MAX_LABEL_VALUES + 1
    queued = sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "jobq_jobs" and s.labels["status"] == "queued"
    )
    assert queued == metrics.MAX_LABEL_VALUES + 30  # none is dropped: the rest count as other


async def test_job_counts_export_zero_for_every_status_instead_of_dropping_the_series(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    job = (await client.post("/jobs", json={"kind": "echo", "queue": "zeros"})).json()
    await client.post(f"/jobs/{job['id']}/cancel")
    text = (await client.get("/metrics")).text
    zeros = {
        s.labels["status"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "jobq_jobs" and s.labels["queue"] == "zeros"
    }
    assert zeros == {
        "queued": 0, "running": 0, "retrying": 0, "succeeded": 0, "failed_permanent": 0,
        "cancelled": 1,
    }  # fmt: skip
    await pool.execute("DELETE FROM jobs WHERE queue = 'zeros'")
    text = (await client.get("/metrics")).text
    assert {"queue": "zeros", "status": "cancelled"} in _series(text, "jobq_jobs")


async def test_metrics_have_no_created_timestamp_series(client: httpx.AsyncClient) -> None:
    await client.post("/jobs", json={"kind": "echo"})
    text = (await client.get("/metrics")).text
    assert "_created" not in text


async def test_queue_wait_is_measured_from_creation_when_run_at_was_in_the_past(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()
    done = asyncio.Event()

    @registry.handler("wait-from-creation")
    async def handle(ctx: JobContext, payload: dict[str, object]) -> None:
        done.set()

    before = _wait_sum("wait-from-creation")
    await queue.enqueue(NewJob(kind="wait-from-creation", run_at=datetime(2001, 1, 1, tzinfo=UTC)))
    worker = Worker(dsn, registry, concurrency=1, settings=Settings(poll_interval_seconds=0.05))
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(done.wait(), 15)

        async def observed() -> bool:
            return _wait_count("wait-from-creation") > 0

        await wait_for(observed)
    finally:
        worker.request_stop()
        await task
    assert _wait_sum("wait-from-creation") - before < 60


def _wait_sum(kind: str) -> float:
    return REGISTRY.get_sample_value("jobq_job_queue_wait_seconds_sum", {"kind": kind}) or 0.0


def _wait_count(kind: str) -> float:
    return REGISTRY.get_sample_value("jobq_job_queue_wait_seconds_count", {"kind": kind}) or 0.0


# -- client disconnects ------------------------------------------------------------------


async def test_a_client_that_disconnects_mid_body_is_not_a_server_error(
    pool: asyncpg.Pool, queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(Settings(), pool=pool)
    sent: list[dict[str, object]] = []
    messages = [
        {"type": "http.request", "body": b'{"kind": "ec', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, object]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/jobs", "raw_path": b"/jobs", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"),
                                     (b"content-length", b"100")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    before = _count_5xx()
    await app(scope, receive, send)  # type: ignore[arg-type]
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert all(int(m["status"]) < 500 for m in starts)  # type: ignore[call-overload]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert _count_5xx() == before
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 0


def _count_5xx() -> float:
    text = metrics.render()[0].decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "jobq_http_requests_total" and s.labels["status"].startswith("5")
    )


# -- list summaries ----------------------------------------------------------------------


async def test_lists_return_summaries_without_payload_result_or_errors(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    big = {"blob": "x" * 100_000}
    created = (await client.post("/jobs", json={"kind": "echo", "payload": big})).json()
    page = await client.get("/jobs")
    assert page.status_code == 200
    (summary,) = page.json()["jobs"]
    assert not {"payload", "result", "errors"} & summary.keys()
    assert summary["id"] == created["id"]
    assert {"kind", "queue", "status", "attempts", "max_attempts", "last_error",
            "created_at", "run_at"} <= summary.keys()  # fmt: skip
    assert len(page.content) < 2_000
    full = (await client.get(f"/jobs/{created['id']}")).json()
    assert full["payload"] == big
    assert {"result", "errors"} <= full.keys()


async def test_the_openapi_document_says_lists_hold_summaries(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    page = doc["components"]["schemas"]["JobPage"]
    item = page["properties"]["jobs"]["items"]["$ref"].rsplit("/", 1)[-1]
    fields = doc["components"]["schemas"][item]["properties"]
    assert not {"payload", "result", "errors"} & fields.keys()
    assert "GET /jobs/{job_id}" in doc["paths"]["/jobs"]["get"]["description"]
