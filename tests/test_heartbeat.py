"""The heartbeat's report of leases it could not extend: rows locked by another session."""

from __future__ import annotations

import logging
import uuid

import pytest

from jobq.queue import NewJob, Queue, lease_of
from jobq.registry import JobContext, Registry
from jobq.settings import Settings
from jobq.worker.execution import JobRunner
from jobq.worker.heartbeat import SKIPPED_NAMED, Heartbeat
from jobq.worker.state import Run, WorkerState

SETTINGS = Settings(heartbeat_seconds=0.5, lease_seconds=5.0)


def heartbeat_of(queue: Queue) -> tuple[WorkerState, Heartbeat]:
    state = WorkerState("w", SETTINGS, kinds=["k"], queues=["default"], concurrency=100)
    runner = JobRunner(state, queue, Registry(), threads=None, backoffs={})
    return state, Heartbeat(state, queue, runner)


async def claimed(queue: Queue, n: int) -> list[Run]:
    await queue.enqueue_many([NewJob("k") for _ in range(n)])
    jobs = await queue.claim("w", ["k"], ["default"], n, lease_seconds=5)
    return [
        Run(j, JobContext(id=j.id, kind="k", queue="default", attempt=1, max_attempts=3,
                          worker_id="w"), lease_of(j))
        for j in jobs
    ]  # fmt: skip


async def test_rows_locked_by_the_worker_s_own_completion_write_are_not_reported(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    # Under load the completion statement holds the rows of the successes it writes: a
    # heartbeat meanwhile skips them, which is routine, and tries again soon.
    state, heartbeat = heartbeat_of(queue)
    runs = await claimed(queue, 3)
    for run in runs:
        state.pending[run.lease] = (run.lease, "null", "k")
    async with queue.pool.acquire() as writer, writer.transaction():
        await writer.execute(
            "SELECT 1 FROM jobs WHERE id = ANY($1::uuid[]) FOR UPDATE", [r.job.id for r in runs]
        )
        with caplog.at_level(logging.WARNING, logger="jobq.worker"):
            assert await heartbeat.once() is False
    assert "not extended" not in caplog.text


async def test_a_warning_about_leases_not_extended_names_at_most_a_few_jobs(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    state, heartbeat = heartbeat_of(queue)
    runs = await claimed(queue, SKIPPED_NAMED + 5)
    for run in runs:
        state.runs[run.lease] = run
    async with queue.pool.acquire() as other, other.transaction():
        await other.execute("SELECT 1 FROM jobs FOR UPDATE")
        with caplog.at_level(logging.WARNING, logger="jobq.worker"):
            assert await heartbeat.once() is False
    (record,) = [r for r in caplog.records if "not extended" in r.getMessage()]
    assert record.getMessage().startswith(f"{SKIPPED_NAMED + 5} lease(s) not extended")
    named = record.job_ids.split(",")  # type: ignore[attr-defined]
    assert named[-1] == "..." and len(named) == SKIPPED_NAMED + 1
    assert {uuid.UUID(i) for i in named[:-1]} <= {r.job.id for r in runs}
