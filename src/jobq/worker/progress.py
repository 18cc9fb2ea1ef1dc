"""The progress writer: what handlers report with ctx.progress, written in batches.

A handler's report only replaces the latest value on its context; the first report since the
last write tells this writer (from any thread). The writer writes every run's latest report in
one statement, then waits `PROGRESS_INTERVAL` before the next: however often handlers report,
a worker writes progress at most 1 / PROGRESS_INTERVAL times a second. A run's last report is
written before its outcome, so that the job ends with it. Each write is fenced by the run's
lease token; progress is best effort: a write that fails is tried again at the next one.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from jobq import db
from jobq.queue import Lease, Queue
from jobq.queue.progress import ProgressReport
from jobq.registry import JobContext
from jobq.worker.state import Run, Stop, WorkerState

log = logging.getLogger("jobq.worker")

PROGRESS_INTERVAL = 0.25


class ProgressWriter:
    def __init__(self, state: WorkerState, queue: Queue) -> None:
        self.state = state
        self.queue = queue
        self.pending: dict[Lease, Run] = {}
        # Leases whose report a write has taken and not yet stored: a run that ends meanwhile
        # must wait for it, or its outcome can move the job before the report lands.
        self.writing: set[Lease] = set()
        self._lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def attach(self, run: Run) -> None:
        """Let `run`'s handler report progress through this writer."""
        # The sink names the run by its lease, not by the run itself: a run that referred to
        # itself through its context would be a reference cycle, freed only by the cyclic
        # garbage collector, whose passes over every finished run cost a drain of no-op jobs
        # about a tenth of its rate.
        run.ctx._progress_sink = functools.partial(self._noted, run.lease)

    def _noted(self, lease: Lease, _ctx: JobContext) -> None:
        # From the handler's thread or the event loop alike.
        self._loop.call_soon_threadsafe(self._note_lease, lease)

    def _note_lease(self, lease: Lease) -> None:
        run = self.state.runs.get(lease)
        # Else it has ended, or its report was taken already (by `flush` before its outcome).
        if run is not None and run.ctx._progress_noted:
            self._note(run)

    def _note(self, run: Run) -> None:
        self.pending[run.lease] = run
        self._ready.set()

    async def loop(self) -> None:
        """Until cancelled."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            await self.write()
            await asyncio.sleep(PROGRESS_INTERVAL)

    def unwritten(self, run: Run) -> bool:
        # Noted is set by the report itself, before this writer hears of it (a callback on the
        # loop): an async handler that reports and returns at once ends before that callback.
        return run.ctx._progress_noted or run.lease in self.pending or run.lease in self.writing

    async def flush(self, run: Run) -> None:
        """Write `run`'s last report now, if it has one not yet written (before its outcome),
        after any write of it under way."""
        async with self._lock:
            if run.ctx._progress_noted or run.lease in self.pending:
                self.pending[run.lease] = run
                await self._write(only=run.lease)

    async def write(self, only: Lease | None = None) -> None:
        async with self._lock:
            await self._write(only)

    async def _write(self, only: Lease | None = None) -> None:
        reports = []
        for lease, run in list(self.pending.items()):
            if only is not None and lease != only:
                continue
            del self.pending[lease]
            # Cleared before the value is read: a report made meanwhile notes the run again.
            run.ctx._progress_noted = False
            value = run.ctx._progress
            if value is None or run.stop_reason is Stop.LEASE_LOST:
                continue
            reports.append(ProgressReport(lease, value[0], value[1]))
        if not reports:
            return
        self.writing.update(r.lease for r in reports)
        try:
            await self.queue.write_progress(reports)
        except Exception as exc:
            if not db.is_unavailable(exc):
                log.exception("writing progress failed")
            for report in reports:  # tried again at the next write, while the run lasts
                still = self.state.runs.get(report.lease)
                if still is not None:
                    # Unwritten again: a run that ends now flushes it before its outcome.
                    still.ctx._progress_noted = True
                    self._note(still)
        finally:
            self.writing.difference_update(r.lease for r in reports)
