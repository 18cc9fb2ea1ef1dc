"""Prometheus metrics, by their documented names."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobq import examples
from jobq.api import create_app
from jobq.queue import Queue
from jobq.settings import Settings
from jobq.worker import Worker
from tests.helpers import wait_for


@pytest.fixture
async def client(queue: Queue, pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(), pool=pool, registry=examples.registry)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return float(samples.get((name, tuple(sorted(labels.items()))), 0.0))


async def test_enqueue_counter_counts_created_jobs_only(client: httpx.AsyncClient) -> None:
    before = value(await scrape(client), "jobq_jobs_enqueued_total", kind="echo")
    await client.post("/jobs", json={"kind": "echo"}, headers={"Idempotency-Key": "m1"})
    await client.post("/jobs", json={"kind": "echo"}, headers={"Idempotency-Key": "m1"})
    after = value(await scrape(client), "jobq_jobs_enqueued_total", kind="echo")
    assert after - before == 1


async def test_job_counts_are_read_from_the_database(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await client.post("/jobs", json={"kind": "echo", "queue": "metrics-q"})
    samples = await scrape(client)
    assert value(samples, "jobq_jobs", queue="metrics-q", status="queued") == 3


async def test_http_metrics_use_the_route_template(client: httpx.AsyncClient) -> None:
    await client.get("/jobs/00000000-0000-0000-0000-000000000000")
    samples = await scrape(client)
    assert (
        value(
            samples, "jobq_http_requests_total", method="GET", route="/jobs/{job_id}", status="404"
        )
        >= 1
    )
    assert not any("00000000" in str(labels) for _, labels in samples)
    assert (
        value(
            samples,
            "jobq_http_request_duration_seconds_count",
            method="GET",
            route="/jobs/{job_id}",
        )
        >= 1
    )


async def test_worker_metrics_count_outcomes_durations_and_waits(
    client: httpx.AsyncClient, queue: Queue, dsn: str
) -> None:
    before = await scrape(client)
    ok = (await client.post("/jobs", json={"kind": "echo"})).json()
    bad = (await client.post("/jobs", json={"kind": "fail", "max_attempts": 2})).json()
    settings = Settings(poll_interval_seconds=0.05, retry_base_seconds=0.01, retry_cap_seconds=0.02)
    worker = Worker(dsn, examples.registry, settings=settings)
    task = asyncio.create_task(worker.run())
    try:
        for job in (ok, bad):
            await wait_for(lambda j=job: _terminal(queue, j["id"]))
    finally:
        worker.request_stop()
        await task
    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("jobq_jobs_finished_total", kind="echo", outcome="succeeded") == 1
    assert delta("jobq_jobs_finished_total", kind="fail", outcome="retried") == 1
    assert delta("jobq_jobs_finished_total", kind="fail", outcome="failed_permanent") == 1
    assert delta("jobq_job_duration_seconds_count", kind="echo") == 1
    assert delta("jobq_job_queue_wait_seconds_count", kind="fail") == 2
    assert value(after, "jobq_worker_jobs_in_flight") == 0


async def _terminal(queue: Queue, job_id: str) -> bool:
    import uuid

    return (await queue.get(uuid.UUID(job_id))).is_terminal


# -- flow control ----------------------------------------------------------------------------


def limit(samples: dict, metric: str, labels: dict[str, str]) -> float:  # type: ignore[type-arg]
    return float(samples.get((metric, tuple(sorted(labels.items()))), 0.0))


async def _two_running_under_limits(queue: Queue) -> None:
    from jobq.queue import Limits, NewJob

    await queue.declare_limits(
        "w",
        {"echo": Limits(max_concurrency=5)},
        {"limited-q": Limits.declare(max_per_key=2, rate_limit="10/s")},
    )
    await queue.enqueue_many(
        [NewJob("echo", queue="limited-q", concurrency_key=k) for k in ("a", "b", "b")]
    )
    claimed = await queue.claim_limited("w", ["echo"], ["limited-q"], 2, lease_seconds=30)
    assert len(claimed) == 2


async def test_limit_gauges_show_running_jobs_against_each_kind_s_and_queue_s_limits(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    await _two_running_under_limits(queue)
    samples = await scrape(client)
    kind = {"scope": "kind", "name": "echo"}
    of_queue = {"scope": "queue", "name": "limited-q"}
    assert limit(samples, "jobq_limit_running", kind) == 2
    assert limit(samples, "jobq_limit_max_concurrency", kind) == 5
    assert limit(samples, "jobq_limit_running", of_queue) == 2
    assert limit(samples, "jobq_limit_max_per_key", of_queue) == 2
    assert limit(samples, "jobq_limit_rate", of_queue) == 10
    assert 0 <= limit(samples, "jobq_limit_tokens", of_queue) <= 10
    assert ("jobq_limit_max_concurrency", tuple(sorted(of_queue.items()))) not in samples


async def test_limit_gauges_have_no_series_per_concurrency_key(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    await _two_running_under_limits(queue)
    labels = {
        name for (metric, ls) in (await scrape(client)) if metric.startswith("jobq_limit_")
        for name, _ in ls
    }  # fmt: skip
    assert labels == {"scope", "name"}


async def test_a_limit_no_longer_declared_leaves_no_series(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    from jobq.queue import Limits

    await _two_running_under_limits(queue)
    await scrape(client)
    await queue.declare_limits("w", {"echo": Limits()}, {"limited-q": Limits()})
    assert not [m for (m, _) in await scrape(client) if m.startswith("jobq_limit_")]
