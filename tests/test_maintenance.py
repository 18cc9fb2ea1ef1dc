"""Maintenance services and the loop a worker runs each of them in."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime, timedelta

import pytest

from jobq import maintenance
from jobq.backoff import Backoff
from jobq.maintenance import Rescuer
from jobq.queue import NewJob, Queue
from jobq.settings import Settings
from jobq.worker.maintenance import run_service
from tests.helpers import wait_for


class Recording:
    """A service that fails its first `failures` passes and records when each pass began."""

    def __init__(self, interval: float, failures: int = 0) -> None:
        self.name = "recording"
        self.interval = interval
        self.failures = failures
        self.passes: list[float] = []

    async def run_once(self) -> None:
        self.passes.append(time.monotonic())
        if len(self.passes) <= self.failures:
            raise RuntimeError("pass failed")


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_the_rescuer_is_a_service_at_the_rescue_interval(queue: Queue) -> None:
    services = maintenance.services(queue, Settings(rescue_interval_seconds=7.0))
    rescuers = [s for s in services if isinstance(s, Rescuer)]
    assert [(s.name, s.interval) for s in rescuers] == [("rescue", 7.0)]


async def test_the_rescuer_retries_a_job_whose_lease_expired_after_its_handlers_backoff(
    queue: Queue,
) -> None:
    job = (await queue.enqueue(NewJob(kind="echo", payload={}, max_attempts=3))).job
    await queue.claim("dead-worker", ["echo"], ["default"], 1, lease_seconds=0.05)
    await queue.pool.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", job.id
    )
    rescuer = Rescuer(queue, Settings(), backoffs={"echo": Backoff(base=600, cap=900)})
    await rescuer.run_once()
    row = await queue.get(job.id)
    assert row.status == "retrying"
    assert row.run_at > datetime.now(UTC) + timedelta(seconds=500)


async def test_a_failed_pass_is_logged_with_the_service_name_and_the_next_pass_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = Recording(interval=0.05, failures=1)
    with caplog.at_level(logging.ERROR, logger="jobq.worker"):
        task = asyncio.create_task(run_service(service))
        try:
            await wait_for(lambda: asyncio.sleep(0, len(service.passes) >= 2), timeout=5)
        finally:
            await _stop(task)
    failed = [r for r in caplog.records if getattr(r, "service", None) == "recording"]
    assert len(failed) == 1
    assert "recording failed" in failed[0].getMessage()
    assert failed[0].exc_info is not None


async def test_passes_of_a_service_are_at_least_nine_tenths_of_its_interval_apart() -> None:
    service = Recording(interval=0.2)
    task = asyncio.create_task(run_service(service))
    try:
        await wait_for(lambda: asyncio.sleep(0, len(service.passes) >= 3), timeout=5)
    finally:
        await _stop(task)
    gaps = [b - a for a, b in zip(service.passes, service.passes[1:], strict=False)]
    assert min(gaps) >= 0.9 * 0.2


async def test_a_service_loop_cancelled_at_shutdown_ends_without_an_error_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = Recording(interval=0.05)
    with caplog.at_level(logging.ERROR, logger="jobq.worker"):
        task = asyncio.create_task(run_service(service))
        await wait_for(lambda: asyncio.sleep(0, bool(service.passes)), timeout=5)
        await _stop(task)
    assert task.cancelled()
    assert not caplog.records
