"""What one worker holds, shared by its loops.

Its runs (one per lease), the successes not yet written, and the events the loops wake each
other with. Everything about a run is keyed by its lease (job id + token), so news about one
attempt never touches another.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jobq.worker
from jobq import metrics
from jobq.queue import Job, Lease
from jobq.registry import JobContext
from jobq.settings import Settings
from jobq.worker.threads import SyncCall


class Stop(enum.Enum):
    """Why a running handler was cancelled by the worker."""

    CANCEL_REQUESTED = "cancel requested"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease lost"


@dataclass
class Run:
    job: Job
    ctx: JobContext
    lease: Lease
    task: asyncio.Task[None] | None = None
    stop_reason: Stop | None = None
    hard_cancel: asyncio.TimerHandle | None = None
    # When the handler really started: for a sync handler, when a thread began the call.
    started: float = field(default_factory=time.monotonic)
    sync_call: SyncCall | None = None
    # Set when the handler's own `timeout=` expired (not a TimeoutError the handler raised).
    timed_out: bool = False

    @property
    def thread_alive(self) -> bool:
        return self.sync_call is not None and self.sync_call.thread_alive


class Retrying:
    """Exponential backoff with jitter for reconnect loops: 50 ms doubling to 5 s."""

    def __init__(self) -> None:
        self.delay = 0.05

    def reset(self) -> None:
        self.delay = 0.05

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay * random.uniform(0.5, 1.0))
        self.delay = min(5.0, self.delay * 2)


class WorkerState:
    def __init__(
        self,
        worker_id: str,
        settings: Settings,
        *,
        kinds: Sequence[str],
        queues: Sequence[str],
        concurrency: int,
    ) -> None:
        self.worker_id = worker_id
        self.settings = settings
        self.kinds = list(kinds)
        self.queues = list(queues)
        self.concurrency = concurrency
        # Keyed by lease: two attempts of one job can be on this worker at once (the first's
        # lease lost while its thread still runs, the second claimed meanwhile).
        self.runs: dict[Lease, Run] = {}
        # Succeeded runs not yet written: lease, result JSON, kind.
        self.pending: dict[Lease, tuple[Lease, str, str]] = {}
        # Set when the grace period ends: the deadline for the writes still owed.
        self.write_deadline: float | None = None
        # New jobs may be due (a NOTIFY, a reconnect, a stop request): claim now.
        self.wake = asyncio.Event()
        self.slot_freed = asyncio.Event()
        # A job of this worker's stopped running as the database sees it: its success was
        # written, or it ended otherwise (its outcome is written before its run ends).
        self.outcome_written = asyncio.Event()
        self.pending_added = asyncio.Event()
        self.stopping = asyncio.Event()
        # A second stop request: no more grace, no more retries of what is owed.
        self.force_stop = asyncio.Event()
        # Prometheus children per kind: `labels()` costs more than the no-op job it counts.
        self._kind_metrics: dict[str, tuple[Any, Any, Any]] = {}

    def leases(self) -> list[Lease]:
        """Every lease this worker holds: its runs' (unless lost) and its unwritten successes'."""
        held = [lease for lease, r in self.runs.items() if r.stop_reason is not Stop.LEASE_LOST]
        held += list(self.pending)
        return held

    def metrics_for(self, kind: str) -> tuple[Any, Any, Any]:
        """(queue wait histogram, duration histogram, succeeded counter) for a kind."""
        m = self._kind_metrics.get(kind)
        if m is None:
            m = self._kind_metrics[kind] = (
                metrics.JOB_QUEUE_WAIT.labels(kind),
                metrics.JOB_DURATION.labels(kind),
                metrics.JOBS_FINISHED.labels(kind, "succeeded"),
            )
        return m

    def extra(self, run: Run) -> dict[str, Any]:
        """A run's log fields."""
        return {
            "job_id": str(run.job.id),
            "kind": run.job.kind,
            "attempt": run.job.attempts,
            "worker_id": self.worker_id,
        }

    def shutdown_write_deadline(self) -> float:
        if self.write_deadline is None:
            # Read from the package at each shutdown, where it is defined and can be lowered.
            self.write_deadline = time.monotonic() + jobq.worker.SHUTDOWN_WRITE_SECONDS
        return self.write_deadline

    def time_left(self, most: float) -> float:
        left = self.shutdown_write_deadline() - time.monotonic()
        return max(0.2, min(most, left))

    async def wait_any(self, event: asyncio.Event, timeout: float) -> None:
        """Until `event`, a stop request or the timeout, whichever comes first."""
        waiters = [
            asyncio.ensure_future(event.wait()),
            asyncio.ensure_future(self.stopping.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def sleep_unless_forced(self, retry: Retrying) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.force_stop.wait(), retry.delay * random.uniform(0.5, 1))
        retry.delay = min(5.0, retry.delay * 2)
