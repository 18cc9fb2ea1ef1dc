"""The completion writer: successes are written in batches.

One statement writes every success that finished since the last write (at most
`MAX_COMPLETION_BATCH`). A write that fails is retried until it lands or the lease is gone (the
heartbeat keeps extending the leases of unwritten successes, and drops those it lost). A
result the database refuses fails its job for good, once.
"""

from __future__ import annotations

import logging
import time

from jobq import db, metrics
from jobq.queue import Lease, Queue
from jobq.worker.state import Retrying, WorkerState

log = logging.getLogger("jobq.worker")

MAX_COMPLETION_BATCH = 2000


class CompletionWriter:
    def __init__(self, state: WorkerState, queue: Queue) -> None:
        self.state = state
        self.queue = queue

    async def loop(self) -> None:
        """Until cancelled: write whenever successes are added."""
        state = self.state
        retry = Retrying()
        while True:
            await state.pending_added.wait()
            state.pending_added.clear()
            while state.pending:
                try:
                    await self.write()
                    retry.reset()
                except Exception as exc:
                    if not db.is_unavailable(exc):
                        log.exception("writing completions failed")
                    await retry.sleep()

    async def write(self) -> None:
        """Write one batch of the successes pending."""
        state = self.state
        batch = list(state.pending.items())[:MAX_COMPLETION_BATCH]
        done = await self.queue.complete_many((lease, result) for _, (lease, result, _) in batch)
        succeeded: dict[str, int] = {}
        for lease, (_, _, kind) in batch:
            if lease.job_id not in done.refused:
                state.pending.pop(lease, None)
            if lease.job_id in done.held:
                succeeded[kind] = succeeded.get(kind, 0) + 1
        for kind, n in succeeded.items():
            state.metrics_for(kind)[2].inc(n)
        state.slot_freed.set()
        state.outcome_written.set()
        for lease, (_, _, kind) in batch:
            if lease.job_id in done.refused:
                # The database refused this result: its job fails for good, once. It stays
                # pending (and leased) until that is written.
                await self._result_refused(lease, kind, done.refused[lease.job_id])
                state.pending.pop(lease, None)
        if done.refused:
            state.slot_freed.set()

    async def _result_refused(self, lease: Lease, kind: str, reason: str) -> None:
        log.warning(
            "result not stored: %s; failing permanently",
            reason,
            extra={"job_id": str(lease.job_id), "kind": kind, "worker_id": self.state.worker_id},
        )
        status = await self.queue.fail_permanently(lease, f"result not stored: {reason}")
        if status is not None:
            metrics.JOBS_FINISHED.labels(kind, status).inc()

    async def flush(self, deadline: float) -> None:
        """At shutdown: write what is pending, until the deadline or a second stop request."""
        state = self.state
        retry = Retrying()
        while state.pending and time.monotonic() < deadline:
            try:
                await self.write()
            except Exception as exc:
                log.warning("could not write completions at shutdown: %s", exc)
                if state.force_stop.is_set():
                    break
                await state.sleep_unless_forced(retry)
        if state.pending:
            log.warning(
                "%d completion(s) not written; their jobs will be rescued", len(state.pending)
            )
