"""GET /stats: what the dashboard and `jobq status` show, over a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from jobq.api import create_app
from jobq.queue import NewJob, Queue
from jobq.settings import Settings


@pytest.fixture
async def client(queue: Queue) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(), pool=queue.pool)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/stats")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def by_queue(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {q["queue"]: q for q in body["queues"]}


async def fail_for_good(queue: Queue, kind: str, error: str) -> None:
    await queue.enqueue(NewJob(kind=kind, max_attempts=1))
    (job,) = await queue.claim("w", [kind], ["default"], 1, lease_seconds=30)
    assert await queue.fail(job, error) == "failed_permanent"


async def test_stats_counts_jobs_by_queue_and_status(
    queue: Queue, client: httpx.AsyncClient
) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    await queue.enqueue(NewJob(kind="echo"))
    await queue.enqueue(NewJob(kind="echo", queue="mail"))
    await queue.claim("w", ["echo"], ["default"], 1, lease_seconds=30)

    queues = by_queue(await stats(client))

    assert queues["default"]["counts"] == {
        "queued": 1,
        "running": 1,
        "retrying": 0,
        "succeeded": 0,
        "failed_permanent": 0,
        "cancelled": 0,
    }
    assert queues["default"]["total"] == 2
    assert queues["mail"]["counts"]["queued"] == 1


async def test_stats_reports_oldest_due_job_age_per_queue(
    queue: Queue, client: httpx.AsyncClient
) -> None:
    now = datetime.now(UTC)
    await queue.enqueue(NewJob(kind="echo", run_at=now - timedelta(seconds=90)))
    await queue.enqueue(NewJob(kind="echo", run_at=now - timedelta(seconds=5)))
    await queue.enqueue(NewJob(kind="echo", queue="later", run_at=now + timedelta(hours=1)))

    queues = by_queue(await stats(client))

    assert 90 <= queues["default"]["oldest_due_age_seconds"] < 150
    assert queues["later"]["oldest_due_age_seconds"] is None  # waiting, but not due yet


async def test_stats_counts_jobs_finished_in_each_of_the_last_15_minutes(
    queue: Queue, client: httpx.AsyncClient
) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    (job,) = await queue.claim("w", ["echo"], ["default"], 1, lease_seconds=30)
    await queue.complete(queue_lease(job))
    await fail_for_good(queue, "boom", "RuntimeError: no")

    minutes = (await stats(client))["finished_per_minute"]

    assert len(minutes) == 15
    assert [m["minute"] for m in minutes] == sorted(m["minute"] for m in minutes)
    current = minutes[-1]
    assert (current["succeeded"], current["failed_permanent"], current["cancelled"]) == (1, 1, 0)
    assert all(m["succeeded"] == 0 for m in minutes[:-1])


async def test_stats_lists_kinds_failing_most_with_their_latest_error(
    queue: Queue, client: httpx.AsyncClient
) -> None:
    await fail_for_good(queue, "often", "RuntimeError: first")
    await fail_for_good(queue, "often", "RuntimeError: latest")
    await fail_for_good(queue, "rarely", "ValueError: once")

    failing = (await stats(client))["failing_kinds"]

    assert [f["kind"] for f in failing] == ["often", "rarely"]
    assert failing[0]["failed_permanent"] == 2
    assert failing[0]["last_error"] == "RuntimeError: latest"


async def test_the_terminal_report_shows_control_characters_of_an_error_escaped(
    queue: Queue,
) -> None:
    # A handler's error can echo its payload: ESC and BEL reached the operator's terminal.
    from jobq import stats as stats_module

    await fail_for_good(queue, "echoes", "RuntimeError: \x1b]0;owned\x07\x1b[2Jok \u202eevil")
    report = stats_module.render_text(await stats_module.collect(queue))
    assert "failing: echoes" in report
    assert "\\u001b]0;owned\\u0007\\u001b[2Jok \\u202eevil" in report
    assert not any(ch in report for ch in "\x1b\x07\u202e")


async def test_stats_lists_waiting_jobs_no_live_worker_handles(
    queue: Queue, client: httpx.AsyncClient
) -> None:
    await queue.pool.execute("TRUNCATE jobq_workers")
    await queue.enqueue(NewJob(kind="handled"))
    await queue.enqueue(NewJob(kind="orphan"))
    await queue.enqueue(NewJob(kind="orphan"))
    await queue.enqueue(NewJob(kind="handled", queue="elsewhere"))
    await queue.worker_seen("w-live", ["handled"], ["default"], 4, ttl_seconds=30)
    await queue.worker_seen("w-dead", ["orphan"], ["default"], 4, ttl_seconds=30)
    await queue.pool.execute(
        "UPDATE jobq_workers SET expires_at = now() - interval '1 second'"
        " WHERE worker_id = 'w-dead'"
    )

    body = await stats(client)

    unhandled = {(u["queue"], u["kind"]): u["count"] for u in body["unhandled"]}
    assert unhandled == {("default", "orphan"): 2, ("elsewhere", "handled"): 1}
    assert [w["worker_id"] for w in body["workers"]] == ["w-live"]


async def test_stats_needs_a_token_when_auth_is_on(queue: Queue) -> None:
    app = create_app(Settings(api_tokens=("s3cret",)), pool=queue.pool)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        denied = await c.get("/stats")
        allowed = await c.get("/stats", headers={"Authorization": "Bearer s3cret"})
    assert denied.status_code == 401
    assert denied.headers["content-type"] == "application/problem+json"
    assert allowed.status_code == 200


async def test_stats_is_documented_in_openapi(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    op = doc["paths"]["/stats"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/StatsOut"
    }
    assert "application/problem+json" in op["responses"]["401"]["content"]
    assert "oldest_due_age_seconds" in doc["components"]["schemas"]["QueueStats"]["properties"]


def queue_lease(job: Any) -> Any:
    from jobq.queue import lease_of

    return lease_of(job)
