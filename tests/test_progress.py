"""Progress: ctx.progress / ctx.set_progress, stored on the job, coalesced, fenced by the lease."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest

from jobq.api import create_app
from jobq.queue import Lease, NewJob, Queue, lease_of
from jobq.queue.progress import ProgressReport
from jobq.registry import JobContext, Registry
from jobq.settings import Settings
from jobq.worker import Worker
from jobq.worker.progress import PROGRESS_INTERVAL, ProgressWriter
from jobq.worker.state import Run, WorkerState
from tests.helpers import wait_for
from tests.test_api import make_client

FAST = Settings(poll_interval_seconds=0.1, heartbeat_seconds=0.5, lease_seconds=5.0)


def context() -> JobContext:
    return JobContext(
        id=uuid.uuid4(), kind="k", queue="default", attempt=1, max_attempts=3, worker_id="w"
    )


@contextlib.asynccontextmanager
async def running(dsn: str, registry: Registry) -> AsyncIterator[Worker]:
    worker = Worker(dsn, registry, settings=FAST, concurrency=4)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.wait_started(), 10)
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)


@pytest.mark.parametrize("fraction", [-0.01, 1.01, math.nan, math.inf, True, "0.5", None])
async def test_a_fraction_outside_0_to_1_or_not_a_number_is_a_value_error(fraction: Any) -> None:
    ctx = context()
    with pytest.raises(ValueError, match="progress"):
        await ctx.progress(fraction)
    with pytest.raises(ValueError, match="progress"):
        ctx.set_progress(fraction)


def test_a_message_too_long_or_with_nul_is_a_value_error() -> None:
    ctx = context()
    for message in ("x" * 1001, "a\x00b", 42):
        with pytest.raises(ValueError, match="message"):
            ctx.set_progress(0.5, message)  # type: ignore[arg-type]


def test_a_message_with_a_lone_surrogate_is_a_value_error() -> None:
    # It can't be stored: left for the worker, it failed the write of every run's report.
    with pytest.raises(ValueError, match="message"):
        context().set_progress(0.5, "bad \ud800")


async def test_progress_is_stored_on_the_job_and_shown_by_get(
    queue: Queue, dsn: str, pool: asyncpg.Pool
) -> None:
    registry = Registry()
    release = asyncio.Event()

    @registry.handler("step")
    async def step(ctx: JobContext, payload: dict[str, Any]) -> None:
        await ctx.progress(0.4, "four of ten")
        await release.wait()

    job = (await queue.enqueue(NewJob("step"))).job
    async with running(dsn, registry):

        async def reported() -> Any:
            return (await queue.get(job.id)).progress

        progress = await wait_for(reported, timeout=10)
        assert progress["fraction"] == 0.4 and progress["message"] == "four of ten"
        assert progress["attempt"] == 1
        async with make_client(create_app(Settings(), pool=pool)) as client:
            shown = (await client.get(f"/jobs/{job.id}")).json()["progress"]
        assert shown["fraction"] == 0.4 and shown["message"] == "four of ten"
        release.set()


async def test_a_sync_handler_reports_with_set_progress_and_the_last_report_is_kept(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()

    @registry.handler("sync.steps")
    def steps(ctx: JobContext, payload: dict[str, Any]) -> str:
        for i in range(1, 1001):
            ctx.set_progress(i / 1000, f"{i} of 1000")
        return "done"

    job = (await queue.enqueue(NewJob("sync.steps"))).job
    async with running(dsn, registry):

        async def ended() -> bool:
            return (await queue.get(job.id)).status == "succeeded"

        await wait_for(ended, timeout=15)
    progress = (await queue.get(job.id)).progress  # from history now
    assert progress is not None
    assert progress["fraction"] == 1.0 and progress["message"] == "1000 of 1000"


async def test_an_async_handler_that_reports_and_returns_at_once_ends_with_its_report(
    queue: Queue, dsn: str
) -> None:
    # The writer hears of a report from a callback on the loop, which runs only after the
    # handler has returned: the run must not end without the report meanwhile.
    registry = Registry()

    @registry.handler("async.last")
    async def last(ctx: JobContext, payload: dict[str, Any]) -> str:
        await ctx.progress(1.0, "all of it")
        return "done"

    jobs = [(await queue.enqueue(NewJob("async.last"))).job for _ in range(20)]
    async with running(dsn, registry):

        async def ended() -> bool:
            return all([(await queue.get(j.id)).status == "succeeded" for j in jobs])

        await wait_for(ended, timeout=15)
    for job in jobs:
        progress = (await queue.get(job.id)).progress
        assert progress is not None
        assert (progress["fraction"], progress["message"]) == (1.0, "all of it")


async def test_a_finished_run_is_freed_without_the_cyclic_garbage_collector(
    queue: Queue, dsn: str
) -> None:
    # A run that refers to itself (its context's progress sink naming the run) lives on until
    # a collector pass: at thousands of jobs a second those passes cost a tenth of the rate.
    registry = Registry()
    contexts: list[weakref.ref[JobContext]] = []

    @registry.handler("noop.kept")
    async def kept(ctx: JobContext, payload: dict[str, Any]) -> None:
        contexts.append(weakref.ref(ctx))

    for _ in range(10):
        await queue.enqueue(NewJob("noop.kept"))
    gc.collect()
    gc.disable()
    try:
        async with running(dsn, registry):

            async def freed() -> bool:
                return len(contexts) == 10 and all(ref() is None for ref in contexts)

            await wait_for(freed, timeout=15)
    finally:
        gc.enable()


class CountingQueue(Queue):
    """The real queue, counting the progress statements it runs."""

    writes = 0

    async def write_progress(self, reports: Sequence[ProgressReport]) -> set[Lease]:
        self.writes += 1
        return await super().write_progress(reports)


async def writing_for_a_claimed_job(
    queue: Queue, writing: Queue
) -> tuple[Run, ProgressWriter, asyncio.Task[None]]:
    """A claimed job's run, and a progress writer over `writing` looping for it."""
    await queue.enqueue(NewJob("echo"))
    (job,) = await queue.claim("w", ["echo"], ["default"], 1, lease_seconds=30)
    state = WorkerState("w", FAST, kinds=["echo"], queues=["default"], concurrency=1)
    writer = ProgressWriter(state, writing)
    run = Run(job, context(), lease_of(job))
    state.runs[run.lease] = run
    writer.attach(run)
    return run, writer, asyncio.create_task(writer.loop())


async def test_a_handler_reporting_in_a_tight_loop_costs_a_few_writes_a_second(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    counting = CountingQueue(pool)
    run, writer, task = await writing_for_a_claimed_job(queue, counting)
    seconds = 1.5
    calls = 0

    def tight_loop() -> None:
        nonlocal calls
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            calls += 1
            run.ctx.set_progress((calls % 1000) / 1000)

    try:
        await asyncio.to_thread(tight_loop)
        run.ctx.set_progress(0.75, "last")
        await writer.flush(run)
        await asyncio.sleep(PROGRESS_INTERVAL * 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert calls > 10_000
    assert counting.writes <= seconds / PROGRESS_INTERVAL + 3
    stored = (await queue.get(run.job.id)).progress
    assert stored is not None and stored["fraction"] == 0.75 and stored["message"] == "last"


class HeldQueue(Queue):
    """The real queue, whose progress statements wait until `release` is set."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.stored = False

    async def write_progress(self, reports: Sequence[ProgressReport]) -> set[Lease]:
        self.entered.set()
        await self.release.wait()
        written = await super().write_progress(reports)
        self.stored = True
        return written


async def test_a_run_ending_while_its_report_is_being_written_waits_for_the_write(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    # The run's outcome moves the job to history: a report written after it is lost.
    held = HeldQueue(pool)
    run, writer, task = await writing_for_a_claimed_job(queue, held)
    try:
        run.ctx.set_progress(0.5, "half")
        await asyncio.wait_for(held.entered.wait(), 5)  # the writer's own write is under way
        assert writer.unwritten(run)
        flushing = asyncio.create_task(writer.flush(run))
        held.release.set()
        await flushing
        assert held.stored
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class FailingOnce(Queue):
    """The real queue, whose first progress statement fails as if the database were away."""

    failed = asyncio.Event()

    async def write_progress(self, reports: Sequence[ProgressReport]) -> set[Lease]:
        if not self.failed.is_set():
            self.failed.set()
            raise ConnectionResetError("the database went away")
        return await super().write_progress(reports)


async def test_a_report_whose_write_failed_is_still_written_before_the_outcome(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    failing = FailingOnce(pool)
    failing.failed = asyncio.Event()
    run, writer, task = await writing_for_a_claimed_job(queue, failing)
    try:
        run.ctx.set_progress(0.5, "half")
        await asyncio.wait_for(failing.failed.wait(), 5)
        await asyncio.sleep(0)  # the failed write's handler has run
        assert writer.unwritten(run)  # the run ending now flushes it, as execution does
        await writer.flush(run)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    stored = (await queue.get(run.job.id)).progress
    assert stored is not None and stored["message"] == "half"


async def test_progress_from_a_lost_lease_writes_nothing(queue: Queue) -> None:
    await queue.enqueue(NewJob("echo"))
    (job,) = await queue.claim("w", ["echo"], ["default"], 1, lease_seconds=30)
    written = await queue.write_progress([ProgressReport(Lease(job.id, uuid.uuid4()), 0.9, None)])
    assert written == set()
    assert (await queue.get(job.id)).progress is None


async def test_the_dashboard_job_page_has_a_progress_field(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    job = (await queue.enqueue(NewJob("echo"))).job
    async with make_client(create_app(Settings(), pool=pool)) as client:
        page = await client.get(f"/ui/jobs/{job.id}")
        script = await client.get("/ui/static/app.js")
    assert page.status_code == 200 and 'id="progress-bar"' in page.text
    assert "j.progress" in script.text
