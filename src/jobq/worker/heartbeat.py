"""The heartbeat: lease extension, cancel news, lost leases, presence.

Every heartbeat interval it records this worker's presence (the kinds and queues it takes, for
the dashboard), then extends the leases of everything it holds, and learns of cancel requests
(the fallback for a missed NOTIFY) and of leases it lost (their runs are abandoned). A heartbeat
that could not extend every lease is tried again soon, well before the lease runs out.
"""

from __future__ import annotations

import asyncio
import logging

from jobq.queue import Queue
from jobq.worker.execution import JobRunner
from jobq.worker.state import WorkerState

log = logging.getLogger("jobq.worker")

# The most job ids a warning about leases not extended names.
SKIPPED_NAMED = 20


class Heartbeat:
    def __init__(self, state: WorkerState, queue: Queue, runner: JobRunner) -> None:
        self.state = state
        self.queue = queue
        self.runner = runner
        self._failing = False
        self._skipping = False

    async def loop(self) -> None:
        """Until cancelled."""
        settings = self.state.settings
        soon = max(0.05, min(1.0, settings.heartbeat_seconds / 4))
        delay = settings.heartbeat_seconds
        while True:
            await self._announce()
            await asyncio.sleep(delay)
            complete = await self.once()
            delay = settings.heartbeat_seconds if complete else soon

    async def _announce(self) -> None:
        state = self.state
        try:
            await self.queue.worker_seen(
                state.worker_id,
                state.kinds,
                state.queues,
                state.concurrency,
                ttl_seconds=max(3 * state.settings.heartbeat_seconds, 1.0),
            )
        except Exception as exc:
            log.debug("could not record worker presence: %s", exc)

    async def once(self) -> bool:
        """Extend every lease this worker holds; False when some could not be (try again soon).

        The statement is bounded: one that is stuck (a table lock) must not hold the loop.
        """
        state = self.state
        settings = state.settings
        leases = state.leases()
        if not leases:
            return True
        timeout = min(max(1.0, settings.heartbeat_seconds), settings.lease_seconds / 2)
        try:
            result = await self.queue.heartbeat(
                leases, lease_seconds=settings.lease_seconds, timeout=timeout
            )
        except Exception as exc:
            # Once per streak: it is retried soon, and an outage would repeat it many times.
            (log.debug if self._failing else log.warning)(
                "heartbeat failed: %s", exc or type(exc).__name__
            )
            self._failing = True
            return False
        if self._failing:
            log.info("heartbeat succeeded again")
            self._failing = False
        for lease in result.cancel_requested:
            run = state.runs.get(lease)
            if run is not None:
                self.runner.request_cancel(run)
        for lease in result.lost:
            state.pending.pop(lease, None)
            run = state.runs.get(lease)
            if run is not None and run.stop_reason is None:
                self.runner.lease_lost(run)
        # Successes being written hold their rows (this worker's own completion statement):
        # routine under load, nothing to report. Others are, once per streak, naming a few.
        elsewhere = [lease for lease in result.skipped if lease not in state.pending]
        if elsewhere and not self._skipping:
            named = ",".join(str(lease.job_id) for lease in elsewhere[:SKIPPED_NAMED])
            log.warning(
                "%d lease(s) not extended: their rows are locked by another session; "
                "trying again soon",
                len(elsewhere),
                extra={"job_ids": named + (",..." if len(elsewhere) > SKIPPED_NAMED else "")},
            )
        self._skipping = bool(elsewhere)
        return not result.skipped
