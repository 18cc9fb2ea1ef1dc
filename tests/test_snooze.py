"""Snooze: a handler puts its job back to wait without counting the attempt."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest

from jobq.api import create_app
from jobq.queue import Job, NewJob, Queue, lease_of
from jobq.registry import JobContext, Registry, Snooze
from jobq.settings import Settings
from jobq.worker import Worker
from tests.helpers import wait_for

FAST = Settings(
    poll_interval_seconds=0.05,
    rescue_interval_seconds=0.1,
    heartbeat_seconds=0.2,
    lease_seconds=2.0,
    retry_base_seconds=0.1,
    retry_cap_seconds=0.4,
)


@contextlib.asynccontextmanager
async def running(dsn: str, registry: Registry) -> AsyncIterator[Worker]:
    worker = Worker(dsn, registry, settings=FAST)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.wait_started(), 10)
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)


async def ended(queue: Queue, job_id: uuid.UUID) -> Job:
    async def check() -> Job | None:
        job = await queue.get(job_id)
        return job if job.is_terminal else None

    return await wait_for(check)


def snoozing_registry(*, sync: bool) -> tuple[Registry, list[int]]:
    """A handler with max_attempts=1 that snoozes its first two runs, then succeeds: it can
    succeed only if the snoozed runs did not spend the one attempt."""
    registry = Registry()
    seen: list[int] = []

    def body(ctx: JobContext) -> dict[str, Any]:
        seen.append(ctx.attempt)
        if len(seen) == 1:
            raise Snooze(0.05)
        if len(seen) == 2:
            ctx.snooze(0)
        return {"runs": len(seen)}

    if sync:

        @registry.handler("snoozer", max_attempts=1)
        def sync_handler(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
            return body(ctx)

    else:

        @registry.handler("snoozer", max_attempts=1)
        async def async_handler(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
            return body(ctx)

    return registry, seen


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
async def test_a_snoozed_run_does_not_count_an_attempt(queue: Queue, dsn: str, sync: bool) -> None:
    registry, seen = snoozing_registry(sync=sync)
    job = (await queue.enqueue(NewJob(kind="snoozer"))).job
    async with running(dsn, registry):
        done = await ended(queue, job.id)
    assert done.status == "succeeded", done.last_error
    assert done.result == {"runs": 3}
    assert seen == [1, 1, 1]  # every run is the first attempt
    assert done.attempts == 1
    assert done.errors == []


async def test_a_snoozed_job_waits_queued_until_its_new_run_at_over_http(
    queue: Queue, pool: asyncpg.Pool, dsn: str
) -> None:
    registry = Registry()

    @registry.handler("later")
    async def later(ctx: JobContext, payload: dict[str, Any]) -> None:
        ctx.snooze(3600)

    job = (await queue.enqueue(NewJob(kind="later"))).job
    async with running(dsn, registry):

        async def snoozed() -> bool:
            current = await queue.get(job.id)
            return current.status == "queued" and current.run_at > job.run_at

        await wait_for(snoozed)
    app = create_app(Settings(), pool=pool)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        body = (await client.get(f"/jobs/{job.id}")).json()
    assert body["status"] == "queued"
    assert body["attempts"] == 0
    assert body["started_at"] is None
    wait = datetime.fromisoformat(body["run_at"]) - datetime.now(UTC)
    assert 3500 < wait.total_seconds() <= 3600
    lease = await pool.fetchrow(
        "SELECT lease_owner, lease_token, lease_expires_at FROM jobs WHERE id = $1", job.id
    )
    assert tuple(lease) == (None, None, None)


async def test_a_snooze_after_failures_keeps_the_failed_attempts(queue: Queue) -> None:
    job = (await queue.enqueue(NewJob(kind="k", max_attempts=3))).job
    (claimed,) = await queue.claim("w", ["k"], ["default"], 1, lease_seconds=10)
    await queue.fail(claimed, "boom")
    await queue.pool.execute("UPDATE jobs SET run_at = now() WHERE id = $1", job.id)
    (again,) = await queue.claim("w", ["k"], ["default"], 1, lease_seconds=10)
    assert await queue.snooze(lease_of(again), 60) == "retrying"
    after = await queue.get(job.id)
    assert (after.status, after.attempts, after.last_error) == ("retrying", 1, "boom")


async def test_a_snooze_from_a_lost_lease_changes_nothing(queue: Queue) -> None:
    job = (await queue.enqueue(NewJob(kind="k"))).job
    (claimed,) = await queue.claim("w", ["k"], ["default"], 1, lease_seconds=10)
    stale = lease_of(claimed).__class__(job.id, uuid.uuid4())
    assert await queue.snooze(stale, 60) is None
    assert (await queue.get(job.id)).status == "running"


async def test_a_snooze_after_a_cancel_request_ends_the_job_cancelled(queue: Queue) -> None:
    job = (await queue.enqueue(NewJob(kind="k"))).job
    (claimed,) = await queue.claim("w", ["k"], ["default"], 1, lease_seconds=10)
    await queue.request_cancel(job.id)
    assert await queue.snooze(lease_of(claimed), 60) == "cancelled"
    assert (await queue.get(job.id)).status == "cancelled"


def test_snooze_refuses_a_negative_or_endless_wait() -> None:
    for bad in (-1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(ValueError, match="snooze seconds"):
            Snooze(bad)  # type: ignore[arg-type]
