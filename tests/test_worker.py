"""The worker runtime, run in-process against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from jobq import examples
from jobq.queue import Job, NewJob, Queue
from jobq.registry import JobContext, Registry
from jobq.settings import Settings
from jobq.worker import Worker
from tests.helpers import ALL_JOBS, wait_for


class Point(BaseModel):
    x: int


FAST = Settings(
    poll_interval_seconds=0.1,
    rescue_interval_seconds=0.1,
    heartbeat_seconds=0.2,
    lease_seconds=2.0,
    retry_base_seconds=0.1,
    retry_cap_seconds=0.4,
    cancel_grace_seconds=0.3,
)


@contextlib.asynccontextmanager
async def running(
    dsn: str, registry: Registry, settings: Settings = FAST, **kwargs: Any
) -> AsyncIterator[Worker]:
    worker = Worker(dsn, registry, settings=settings, **kwargs)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.wait_started(), 10)
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)


async def finished(queue: Queue, job_id: uuid.UUID, timeout: float = 15.0) -> Job:
    async def check() -> Job | None:
        job = await queue.get(job_id)
        return job if job.is_terminal else None

    return await wait_for(check, timeout)


async def enqueue(queue: Queue, kind: str, payload: dict[str, Any] | None = None, **kw: Any) -> Job:
    return (await queue.enqueue(NewJob(kind=kind, payload=payload or {}, **kw))).job


async def test_runs_a_job_and_stores_its_result(queue: Queue, dsn: str) -> None:
    job = await enqueue(queue, "echo", {"hello": "world"})
    async with running(dsn, examples.registry):
        done = await finished(queue, job.id)
    assert done.status == "succeeded"
    assert done.result == {"hello": "world"}
    assert done.attempts == 1


async def test_sync_handlers_run_in_a_thread(queue: Queue, dsn: str) -> None:
    registry = Registry()
    loop_thread: list[bool] = []

    @registry.handler("sync")
    def handler(ctx: JobContext, payload: dict[str, Any]) -> int:
        try:
            asyncio.get_running_loop()
            loop_thread.append(True)
        except RuntimeError:
            loop_thread.append(False)
        return 7

    job = await enqueue(queue, "sync")
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert (done.status, done.result) == ("succeeded", 7)
    assert loop_thread == [False]


async def test_sync_handlers_run_up_to_concurrency_at_once(queue: Queue, dsn: str) -> None:
    registry = Registry()
    lock = threading.Lock()
    running_now = 0
    peak = 0
    all_in = threading.Event()

    @registry.handler("blocking")
    def blocking(ctx: JobContext, payload: dict[str, Any]) -> None:
        nonlocal running_now, peak
        with lock:
            running_now += 1
            peak = max(peak, running_now)
            if running_now == 12:
                all_in.set()
        all_in.wait(timeout=10)  # hold every thread until all twelve are in
        with lock:
            running_now -= 1

    await queue.enqueue_many([NewJob(kind="blocking") for _ in range(12)])
    async with running(dsn, registry, concurrency=12):
        await wait_for(
            lambda: queue.pool.fetchval(
                f"SELECT count(*) = 12 FROM {ALL_JOBS} WHERE status='succeeded'"
            )
        )
    assert peak == 12


async def test_flaky_job_retries_with_delays_inside_the_backoff_bounds(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()
    starts: list[float] = []

    @registry.handler("flaky", retry_base_seconds=0.2, retry_cap_seconds=0.5)
    async def flaky(ctx: JobContext, payload: dict[str, Any]) -> str:
        starts.append(time.monotonic())
        if ctx.attempt < 3:
            raise RuntimeError(f"attempt {ctx.attempt}")
        return "ok"

    job = await enqueue(queue, "flaky", max_attempts=3)
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert done.status == "succeeded" and done.attempts == 3
    assert [e["attempt"] for e in done.errors] == [1, 2]
    assert "attempt 1" in done.errors[0]["error"]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # A retry never starts before its delay (>= base); the cap bounds it from above, plus
    # at most one poll interval and scheduling noise.
    assert all(0.2 <= g <= 0.5 + FAST.poll_interval_seconds + 1.0 for g in gaps), gaps


async def test_job_fails_permanently_after_max_attempts(queue: Queue, dsn: str) -> None:
    job = await enqueue(queue, "fail", {"message": "nope"}, max_attempts=2)
    async with running(dsn, examples.registry):
        done = await finished(queue, job.id)
    assert done.status == "failed_permanent"
    assert done.attempts == 2
    assert len(done.errors) == 2
    assert (done.last_error or "").startswith("RuntimeError: nope")


async def test_running_job_observes_cancel_and_ends_cancelled(queue: Queue, dsn: str) -> None:
    job = await enqueue(queue, "sleep", {"seconds": 30})
    async with running(dsn, examples.registry):
        await wait_for(lambda: _status_is(queue, job.id, "running"))
        asked = time.monotonic()
        await queue.request_cancel(job.id)
        done = await finished(queue, job.id)
        observed = time.monotonic() - asked
    assert done.status == "cancelled"
    assert observed < 10  # well before the 30 s sleep would have ended


async def test_handler_that_ignores_cancel_is_cancelled_hard(queue: Queue, dsn: str) -> None:
    registry = Registry()
    interrupted = asyncio.Event()

    @registry.handler("stubborn")
    async def stubborn(ctx: JobContext, payload: dict[str, Any]) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            interrupted.set()
            raise

    job = await enqueue(queue, "stubborn")
    async with running(dsn, registry):
        await wait_for(lambda: _status_is(queue, job.id, "running"))
        await queue.request_cancel(job.id)
        done = await finished(queue, job.id)
    assert done.status == "cancelled"
    assert interrupted.is_set()


async def test_timeout_counts_as_a_failed_attempt(queue: Queue, dsn: str) -> None:
    registry = Registry()

    @registry.handler("slow", timeout=0.1)
    async def slow(ctx: JobContext, payload: dict[str, Any]) -> None:
        await asyncio.sleep(10)

    job = await enqueue(queue, "slow", max_attempts=2)
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert done.status == "failed_permanent"
    assert done.attempts == 2
    assert all("timed out" in e["error"] for e in done.errors)


async def test_payload_that_fails_validation_fails_permanently_without_running(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()
    calls: list[Any] = []

    @registry.handler("typed")
    async def typed(ctx: JobContext, payload: Point) -> int:
        calls.append(payload)
        return payload.x

    good = await enqueue(queue, "typed", {"x": 3})
    bad = await enqueue(queue, "typed", {"x": "not a number"}, max_attempts=5)
    async with running(dsn, registry):
        done_good = await finished(queue, good.id)
        done_bad = await finished(queue, bad.id)
    assert (done_good.status, done_good.result) == ("succeeded", 3)
    assert calls == [Point(x=3)]
    assert done_bad.status == "failed_permanent" and done_bad.attempts == 1
    assert "PayloadInvalid" in (done_bad.last_error or "")


async def test_result_that_is_not_json_fails_the_attempt(queue: Queue, dsn: str) -> None:
    registry = Registry()

    @registry.handler("odd")
    async def odd(ctx: JobContext, payload: dict[str, Any]) -> object:
        return object()

    job = await enqueue(queue, "odd", max_attempts=1)
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert done.status == "failed_permanent"
    assert "result" in (done.last_error or "")


async def test_jobs_of_other_kinds_stay_queued(queue: Queue, dsn: str) -> None:
    other = await enqueue(queue, "unknown.kind")
    mine = await enqueue(queue, "echo")
    async with running(dsn, examples.registry):
        await finished(queue, mine.id)
    assert (await queue.get(other.id)).status == "queued"


async def test_delayed_job_starts_once_due(queue: Queue, dsn: str) -> None:
    from datetime import UTC, datetime, timedelta

    due = datetime.now(UTC) + timedelta(seconds=0.5)
    job = await enqueue(queue, "echo", run_at=due)
    async with running(dsn, examples.registry):
        done = await finished(queue, job.id)
    assert done.started_at is not None and done.started_at >= due


async def test_worker_rescues_a_job_whose_worker_died(queue: Queue, dsn: str) -> None:
    job = await enqueue(queue, "echo")
    # A worker claims it and dies: the lease runs out with nobody heartbeating.
    await queue.claim("dead-worker", ["echo"], ["default"], 1, lease_seconds=0.2)
    async with running(dsn, examples.registry):
        done = await finished(queue, job.id)
    assert done.status == "succeeded"
    assert done.attempts == 2
    assert "worker lost" in done.errors[0]["error"]


async def test_heartbeats_keep_long_jobs_leased(queue: Queue, dsn: str) -> None:
    settings = Settings(
        poll_interval_seconds=0.1,
        rescue_interval_seconds=0.1,
        heartbeat_seconds=0.1,
        lease_seconds=0.5,
    )
    job = await enqueue(queue, "sleep", {"seconds": 1.5})
    async with running(dsn, examples.registry, settings=settings):
        done = await finished(queue, job.id)
    assert done.status == "succeeded"
    assert done.attempts == 1 and done.errors == []


async def test_shutdown_lets_running_jobs_finish_within_grace(queue: Queue, dsn: str) -> None:
    job = await enqueue(queue, "sleep", {"seconds": 0.3})
    worker = Worker(dsn, examples.registry, settings=FAST, shutdown_grace=10)
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: _status_is(queue, job.id, "running"))
    worker.request_stop()
    await asyncio.wait_for(task, 30)
    assert (await queue.get(job.id)).status == "succeeded"


async def test_shutdown_returns_unfinished_jobs_without_counting_the_attempt(
    queue: Queue, dsn: str
) -> None:
    job = await enqueue(queue, "sleep", {"seconds": 30})
    worker = Worker(dsn, examples.registry, settings=FAST, shutdown_grace=0.2)
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: _status_is(queue, job.id, "running"))
    worker.request_stop()
    await asyncio.wait_for(task, 30)
    row = await queue.get(job.id)
    assert (row.status, row.attempts) == ("queued", 0)


async def test_a_second_stop_request_ends_the_grace_period(queue: Queue, dsn: str) -> None:
    job = await enqueue(queue, "sleep", {"seconds": 60})
    worker = Worker(dsn, examples.registry, settings=FAST, shutdown_grace=300)
    task = asyncio.create_task(worker.run())
    await wait_for(lambda: _status_is(queue, job.id, "running"))
    worker.request_stop()
    worker.request_stop()
    await asyncio.wait_for(task, 30)
    assert (await queue.get(job.id)).status == "queued"


async def test_bursts_of_concurrent_enqueues_wake_the_worker_for_every_job(
    queue: Queue, dsn: str
) -> None:
    # Polling is off in effect: only NOTIFYs wake the worker. With a wide debounce window only
    # the first insert of a burst notifies inline; the trailing NOTIFY must cover the rest.
    settings = Settings(poll_interval_seconds=300, rescue_interval_seconds=300)
    producer = Queue(queue.pool, notify_window=0.3)
    async with running(dsn, examples.registry, settings=settings, concurrency=50):
        for burst in range(3):
            await asyncio.gather(
                *(producer.enqueue(NewJob(kind="echo", payload={"b": burst})) for _ in range(40))
            )
            await wait_for(
                lambda: queue.pool.fetchval(
                    f"SELECT count(*) = 0 FROM {ALL_JOBS} WHERE status <> 'succeeded'"
                ),
                timeout=15,
            )
    assert await queue.pool.fetchval(f"SELECT count(*) FROM {ALL_JOBS}") == 120


async def test_concurrency_limits_jobs_in_flight(queue: Queue, dsn: str) -> None:
    registry = Registry()
    current = 0
    peak = 0

    @registry.handler("busy")
    async def busy(ctx: JobContext, payload: dict[str, Any]) -> None:
        nonlocal current, peak
        current += 1
        peak = max(peak, current)
        await asyncio.sleep(0.02)
        current -= 1

    await queue.enqueue_many([NewJob(kind="busy") for _ in range(60)])
    async with running(dsn, registry, concurrency=4):
        await wait_for(
            lambda: queue.pool.fetchval(
                f"SELECT count(*) = 60 FROM {ALL_JOBS} WHERE status='succeeded'"
            )
        )
    assert peak == 4


@pytest.mark.parametrize("concurrency", [0, -1])
def test_concurrency_must_be_positive(concurrency: int) -> None:
    with pytest.raises(ValueError):
        Worker("postgresql://unused", examples.registry, concurrency=concurrency)


async def _status_is(queue: Queue, job_id: uuid.UUID, status: str) -> bool:
    return (await queue.get(job_id)).status == status


# -- outcomes after a cancel request ---------------------------------------------------


async def test_a_failure_after_an_acknowledged_cancel_ends_the_job_cancelled(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()
    runs: list[int] = []

    @registry.handler("fails_when_cancelled")
    async def fails_when_cancelled(ctx: JobContext, payload: dict[str, Any]) -> None:
        runs.append(ctx.attempt)
        await ctx.wait_cancelled()
        raise RuntimeError("cleanup went wrong")

    job = await enqueue(queue, "fails_when_cancelled", max_attempts=3)
    async with running(dsn, registry):
        await wait_for(lambda: _status_is(queue, job.id, "running"))
        await queue.request_cancel(job.id)
        done = await finished(queue, job.id)
    assert (done.status, done.attempts, runs) == ("cancelled", 1, [1])
    assert (done.last_error or "").startswith("RuntimeError: cleanup went wrong")


async def test_a_timeout_after_an_acknowledged_cancel_ends_the_job_cancelled(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()

    @registry.handler("ignores_cancel", timeout=0.5)
    async def ignores_cancel(ctx: JobContext, payload: dict[str, Any]) -> None:
        await asyncio.sleep(30)

    job = await enqueue(queue, "ignores_cancel", max_attempts=3)
    patient = dataclasses.replace(FAST, cancel_grace_seconds=30)
    async with running(dsn, registry, settings=patient):
        await wait_for(lambda: _status_is(queue, job.id, "running"))
        await queue.request_cancel(job.id)
        done = await finished(queue, job.id)
    assert (done.status, done.attempts) == ("cancelled", 1)


async def test_a_handler_that_returns_after_a_cancel_request_ends_succeeded_with_its_result(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()

    @registry.handler("finishes_anyway")
    async def finishes_anyway(ctx: JobContext, payload: dict[str, Any]) -> str:
        await ctx.wait_cancelled()
        return "done before stopping"

    job = await enqueue(queue, "finishes_anyway")
    async with running(dsn, registry):
        await wait_for(lambda: _status_is(queue, job.id, "running"))
        await queue.request_cancel(job.id)
        done = await finished(queue, job.id)
    assert (done.status, done.result, done.cancel_requested) == (
        "succeeded",
        "done before stopping",
        True,
    )


# -- what a failure records --------------------------------------------------------------


async def test_a_handlers_own_timeout_error_is_a_failure_with_its_message(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()

    @registry.handler("upstream", timeout=30)
    async def upstream(ctx: JobContext, payload: dict[str, Any]) -> None:
        raise TimeoutError("upstream took too long")

    job = await enqueue(queue, "upstream", max_attempts=1)
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert done.status == "failed_permanent"
    assert done.last_error == "TimeoutError: upstream took too long"


async def test_stored_errors_carry_the_message_without_a_traceback(queue: Queue, dsn: str) -> None:
    job = await enqueue(queue, "fail", {"message": "nope"}, max_attempts=1)
    async with running(dsn, examples.registry):
        done = await finished(queue, job.id)
    assert done.last_error == "RuntimeError: nope"
    assert [e["error"] for e in done.errors] == ["RuntimeError: nope"]


async def test_a_failed_attempts_traceback_goes_to_the_worker_log(
    queue: Queue, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    job = await enqueue(queue, "fail", {"message": "nope"}, max_attempts=1)
    with caplog.at_level(logging.WARNING, logger="jobq.worker"):
        async with running(dsn, examples.registry):
            await finished(queue, job.id)
    failed = [r for r in caplog.records if getattr(r, "job_id", None) == str(job.id)]
    assert any(r.exc_info and "nope" in str(r.exc_info[1]) for r in failed)


async def test_a_handlers_max_attempts_applies_to_a_job_enqueued_without_one(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()

    @registry.handler("fails", max_attempts=2)
    async def fails(ctx: JobContext, payload: dict[str, Any]) -> None:
        raise RuntimeError(f"attempt {ctx.attempt} of {ctx.max_attempts}")

    job = await enqueue(queue, "fails")  # FAST's default would be 3
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert (done.status, done.attempts, done.max_attempts) == ("failed_permanent", 2, 2)
    assert done.last_error == "RuntimeError: attempt 2 of 2"


# -- sync handlers: one run at a time, however it ends ----------------------------------


async def test_a_timed_out_sync_job_is_not_run_again_while_its_thread_still_runs(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()
    spans: list[tuple[int, float, float]] = []

    @registry.handler("slow", timeout=0.1)
    def slow(ctx: JobContext, payload: dict[str, Any]) -> str:
        start = time.monotonic()
        if ctx.attempt == 1:
            time.sleep(0.8)  # far past the timeout: a thread cannot be interrupted
        spans.append((ctx.attempt, start, time.monotonic()))
        return "ok"

    job = await enqueue(queue, "slow", max_attempts=2)
    async with running(dsn, registry, concurrency=2):
        done = await finished(queue, job.id)
    assert (done.status, done.attempts) == ("succeeded", 2)
    assert "timed out" in done.errors[0]["error"]
    (_, _, first_end), (_, second_start, _) = sorted(spans)
    assert second_start >= first_end


async def test_a_sync_handler_s_timeout_counts_from_its_real_start(queue: Queue, dsn: str) -> None:
    registry = Registry()

    @registry.handler("slow", timeout=0.3)
    def slow(ctx: JobContext, payload: dict[str, Any]) -> float:
        time.sleep(payload["seconds"])
        return float(payload["seconds"])

    first = await enqueue(queue, "slow", {"seconds": 0.8}, priority=0, max_attempts=1)
    second = await enqueue(queue, "slow", {"seconds": 0.05}, priority=1, max_attempts=1)
    async with running(dsn, registry, concurrency=1):
        a = await finished(queue, first.id)
        b = await finished(queue, second.id)
    assert a.status == "failed_permanent"
    # The second job waited for the first one's thread; its 0.3 s started when it did.
    assert (b.status, b.result, b.errors) == ("succeeded", 0.05, [])


async def test_a_sync_handler_that_ignores_a_cancel_keeps_its_job_and_slot_until_it_returns(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()
    began = threading.Event()
    times: dict[str, float] = {}

    @registry.handler("deaf")
    def deaf(ctx: JobContext, payload: dict[str, Any]) -> None:
        if payload.get("deaf"):
            began.set()
            time.sleep(1.0)  # ignores ctx.cancelled, far past FAST.cancel_grace_seconds
            times["deaf_returned"] = time.time()
        else:
            times["next_started"] = time.time()

    deaf_job = await enqueue(queue, "deaf", {"deaf": True}, priority=0)
    next_job = await enqueue(queue, "deaf", priority=1)

    async def deaf_began() -> bool:
        return began.is_set()

    async with running(dsn, registry, concurrency=1):
        await wait_for(deaf_began)
        await queue.request_cancel(deaf_job.id)
        cancelled = await finished(queue, deaf_job.id)
        await finished(queue, next_job.id)
    assert cancelled.finished_at is not None
    assert cancelled.finished_at.timestamp() >= times["deaf_returned"]
    assert times["next_started"] >= times["deaf_returned"]


async def test_shutdown_past_the_grace_leaves_a_running_sync_job_leased_and_stops_on_time(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()
    began, release = threading.Event(), threading.Event()

    @registry.handler("stuck")
    def stuck(ctx: JobContext, payload: dict[str, Any]) -> None:
        began.set()
        release.wait(timeout=30)

    async def stuck_began() -> bool:
        return began.is_set()

    job = await enqueue(queue, "stuck")
    worker = Worker(dsn, registry, settings=FAST, shutdown_grace=0.2)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.wait_started(), 10)
        await wait_for(stuck_began)
        asked = time.monotonic()
        worker.request_stop()
        await asyncio.wait_for(task, 10)
        took = time.monotonic() - asked
        row = await queue.get(job.id)
    finally:
        release.set()
    assert took < 3  # the grace, then the writes: the thread (30 s) is not waited for
    # Not released while its function still runs: no other worker can start it meanwhile.
    assert (row.status, row.attempts) == ("running", 1)


# -- leases: one attempt's news never touches another -----------------------------------

QUIET = Settings(
    poll_interval_seconds=0.1,
    rescue_interval_seconds=600,
    heartbeat_seconds=300,
    lease_seconds=600,
    cancel_grace_seconds=0.3,
)


async def test_a_late_lease_lost_about_attempt_1_never_stops_attempt_2_on_the_same_worker(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()
    gate = asyncio.Event()
    interrupted: list[int] = []

    @registry.handler("twice")
    async def twice(ctx: JobContext, payload: dict[str, Any]) -> int:
        try:
            await (asyncio.sleep(60) if ctx.attempt == 1 else gate.wait())
        except asyncio.CancelledError:
            interrupted.append(ctx.attempt)
            raise
        return ctx.attempt

    @registry.handler("held")
    async def held(ctx: JobContext, payload: dict[str, Any]) -> None:
        await gate.wait()

    job = await enqueue(queue, "twice", max_attempts=3)
    other = await enqueue(queue, "held")
    async with running(dsn, registry, settings=QUIET, concurrency=3) as worker:
        await wait_for(lambda: _status_is(queue, job.id, "running"))
        await wait_for(lambda: _status_is(queue, other.id, "running"))
        async with queue.pool.acquire() as operator, operator.transaction():
            await operator.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", other.id)

            # Attempt 1's lease is lost (expired and rescued); the next attempt is not yet due.
            # Repeated until it holds: a heartbeat the worker sends on its own (e.g. when its
            # listener connects) may extend the lease again in between.
            async def rescued() -> bool:
                await queue.pool.execute(
                    "UPDATE jobs SET lease_expires_at = now() - interval '1 second'"
                    " WHERE id = $1 AND status = 'running' AND attempts = 1",
                    job.id,
                )
                await queue.rescue()
                await queue.pool.execute(
                    "UPDATE jobs SET run_at = now() + interval '1 hour'"
                    " WHERE id = $1 AND status = 'retrying'",
                    job.id,
                )
                row = await queue.get(job.id)
                return row.status == "retrying" or row.attempts == 2

            await wait_for(rescued)
            # A heartbeat about attempt 1 (one that waits for row locks answers only once
            # the other job's row is free, after attempt 2 has started).
            late = asyncio.create_task(worker.heartbeat_once())
            await asyncio.sleep(0)
            await queue.pool.execute("UPDATE jobs SET run_at = now() WHERE id = $1", job.id)

            async def second_attempt_running() -> bool:
                row = await queue.get(job.id)
                return (row.status, row.attempts) == ("running", 2)

            await wait_for(second_attempt_running)
        await asyncio.wait_for(late, 10)
        await worker.heartbeat_once()
        gate.set()
        done = await finished(queue, job.id)
        await finished(queue, other.id)
    assert (done.status, done.attempts, done.result) == ("succeeded", 2, 2)
    assert interrupted == [1]


async def test_a_row_locked_by_someone_else_costs_the_worker_none_of_its_leases(
    queue: Queue, dsn: str
) -> None:
    # No rescuer of its own: what is under test is only whether the leases keep moving.
    settings = Settings(
        poll_interval_seconds=0.1,
        rescue_interval_seconds=600,
        heartbeat_seconds=0.2,
        lease_seconds=1.0,
    )
    registry = Registry()
    gate = asyncio.Event()
    starts: list[uuid.UUID] = []

    @registry.handler("hold")
    async def hold(ctx: JobContext, payload: dict[str, Any]) -> None:
        starts.append(ctx.id)
        await gate.wait()

    a = await enqueue(queue, "hold")
    b = await enqueue(queue, "hold")
    async with running(dsn, registry, settings=settings, concurrency=2):
        await wait_for(lambda: _status_is(queue, a.id, "running"))
        await wait_for(lambda: _status_is(queue, b.id, "running"))
        async with queue.pool.acquire() as operator, operator.transaction():
            await operator.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", b.id)
            locked_at = await queue.pool.fetchval("SELECT clock_timestamp()")

            async def a_extended_past_two_leases() -> bool:
                row = await queue.get(a.id)
                limit = locked_at + timedelta(seconds=2 * settings.lease_seconds)
                return row.status == "running" and (row.lease_expires_at or limit) > limit

            await wait_for(a_extended_past_two_leases, timeout=6)
        gate.set()
        done_a = await finished(queue, a.id)
        done_b = await finished(queue, b.id)
    assert (done_a.status, done_a.attempts) == ("succeeded", 1)
    assert (done_b.status, done_b.attempts) == ("succeeded", 1)
    assert sorted(starts) == sorted([a.id, b.id])


async def test_a_heartbeat_stuck_behind_a_table_lock_gives_up_at_its_timeout(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()
    gate = asyncio.Event()

    @registry.handler("hold")
    async def hold(ctx: JobContext, payload: dict[str, Any]) -> None:
        await gate.wait()

    job = await enqueue(queue, "hold")
    async with running(dsn, registry, shutdown_grace=0) as worker:
        await wait_for(lambda: _status_is(queue, job.id, "running"))
        async with queue.pool.acquire() as operator, operator.transaction():
            await operator.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
            asked = time.monotonic()
            extended = await asyncio.wait_for(worker.heartbeat_once(), 10)
            took = time.monotonic() - asked
        gate.set()
        await finished(queue, job.id)
    assert extended is False  # to be tried again soon
    # Bounded by min(max(1 s, heartbeat), lease / 2) = 1 s here, not by the lock's duration.
    assert took < 5


def test_a_worker_works_the_queues_its_registry_names_unless_told_otherwise() -> None:
    # A queue declared with limits, or one a schedule enqueues into, is one its workers must
    # work: `jobq worker` and `jobq dev` without --queues would leave its jobs waiting.
    registry = Registry()
    registry.queue("tenants", fair=True)
    registry.periodic(every=timedelta(minutes=1), kind="report", queue="reports")

    @registry.handler("report")
    async def report(ctx: JobContext, payload: dict[str, Any]) -> None: ...

    assert Worker("postgresql:///x", registry).queues == ["default", "reports", "tenants"]
    assert Worker("postgresql:///x", registry, queues=["mail"]).queues == ["mail"]


async def test_a_worker_without_queues_runs_jobs_of_a_queue_its_registry_declares(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()
    registry.queue("tenants", fair=True)

    @registry.handler("tenant.sync")
    async def sync(ctx: JobContext, payload: dict[str, Any]) -> str:
        return "synced"

    new = NewJob(kind="tenant.sync", queue="tenants", concurrency_key="acme")
    job = (await queue.enqueue(new)).job
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert (done.status, done.result) == ("succeeded", "synced")


async def test_a_limited_worker_claims_after_its_own_successes_are_written_not_before(
    queue: Queue, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A success not written yet still holds its key's slot: a claim sent beside its write
    # finds the key full and comes back empty, a wasted claim per job.
    from jobq.queue.flow import Flow, LimitedClaim
    from jobq.queue.leases import Leases

    registry = Registry()

    @registry.handler("one.at.a.time", concurrency_key="account", max_per_key=1)
    async def step(ctx: JobContext, payload: dict[str, Any]) -> None:
        return None

    claims: list[int] = []
    claim_limited_held, complete_many = Flow.claim_limited_held, Leases.complete_many

    async def counted(self: Flow, *args: Any, **kwargs: Any) -> LimitedClaim:
        claim = await claim_limited_held(self, *args, **kwargs)
        claims.append(len(claim.jobs))
        return claim

    async def busy_database(self: Leases, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.01)  # a write that takes longer than a claim
        return await complete_many(self, *args, **kwargs)

    monkeypatch.setattr(Flow, "claim_limited_held", counted)
    monkeypatch.setattr(Leases, "complete_many", busy_database)
    jobs = [await enqueue(queue, "one.at.a.time", {"account": "acme"}) for _ in range(10)]
    # One slot: the claim loop wakes as soon as a run ends, before its success is written.
    async with running(dsn, registry, concurrency=1):
        for job in jobs:
            assert (await finished(queue, job.id)).status == "succeeded"
    taken, until_all_taken = 0, []
    for n in claims:
        if taken == len(jobs):
            break
        taken += n
        until_all_taken.append(n)
    assert 0 not in until_all_taken, claims
