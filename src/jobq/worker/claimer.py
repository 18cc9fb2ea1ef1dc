"""The claim loop: keeps up to `concurrency` jobs in flight.

It claims batches sized to the free slots (at most `batch_size`), and sleeps until a NOTIFY, a
freed slot or the poll interval: delayed and retrying jobs have no NOTIFY when they fall due.
It stops claiming while too many successes wait to be written (the database is away), so a
worker never runs far ahead of what it can record.

Once a second it asks whether a limit covers one of its kinds or queues (whichever worker
stored it): then it claims with the limited claim, which honours them, as well as with the
plain claim, which takes what no limit covers. After a short claim it tries again soon only
when a bound (a limit full, a bucket empty, the key walk's bound) kept jobs back, since slots
and tokens free up without a NOTIFY; when nothing was kept back it waits for a NOTIFY or the
poll, like the plain claim. Its own successes not written yet still hold their slots, so a
limited claim first waits, briefly, for their write. Otherwise it claims with the plain claim
only, which costs what it did before flow control existed (docs/flow-control.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from jobq import db, metrics
from jobq.queue import Job, Queue
from jobq.worker.completions import MAX_COMPLETION_BATCH
from jobq.worker.execution import JobRunner
from jobq.worker.state import Retrying, WorkerState

log = logging.getLogger("jobq.worker")

MAX_CLAIM_BATCH = 500
# How often a worker looks for limits stored for its kinds and queues.
LIMITS_REFRESH_SECONDS = 1.0
# Under limits, a claim that got fewer jobs than it asked for because a bound kept some back is
# tried again this soon: slots freed and tokens refilled wake nobody.
LIMITED_RETRY_SECONDS = 0.05


class Claimer:
    def __init__(
        self,
        state: WorkerState,
        queue: Queue,
        runner: JobRunner,
        *,
        batch_size: int,
        max_attempts: Mapping[str, int],
    ) -> None:
        self.state = state
        self.queue = queue
        self.runner = runner
        self.batch_size = batch_size
        # What a job enqueued without max_attempts gets when this worker claims it.
        self.max_attempts = max_attempts
        self.limited = False
        # Limits cover every kind or every queue of this worker: the plain claim is skipped.
        self._all_limited = False
        self._limited_first = False
        self._limits_checked = -float("inf")
        # Whether the last limited claim was cut short by a bound (jobs wait that it could not
        # take): then the next claim comes soon, not at the next NOTIFY or poll.
        self.held_back = False
        # Whether the last limited claim found a keyed queue: else the next skips the key walk.
        self._walk_keys = True
        # The kinds the limited claim has handed out (at most the registry's): their successes
        # hold slots until written.
        self._limited_kinds: set[str] = set()

    async def _refresh_limited(self) -> None:
        now = time.monotonic()
        if now - self._limits_checked < LIMITS_REFRESH_SECONDS:
            return
        state = self.state
        self.limited, self._all_limited = await self.queue.limits_cover(state.kinds, state.queues)
        self._limits_checked = now

    async def _claim(self, want: int) -> int:
        """Start up to `want` jobs; how many. Under limits, the plain claim still takes the
        kinds and queues no limit covers (it leaves limited ones out), so that they never wait
        behind a limited backlog nor pay for the limited claim; the limited claim takes the
        rest of the slots. The two take turns going first, so that neither side's backlog
        starves the other. Each claim's jobs start as soon as it returns."""
        state = self.state
        claims: list[Callable[..., Awaitable[list[Job]]]] = [self.queue.claim]
        if self._all_limited:  # implies limited
            claims = [self._claim_limited]
        elif self.limited:
            self._limited_first = not self._limited_first
            claims = (
                [self._claim_limited, self.queue.claim]
                if self._limited_first
                else [self.queue.claim, self._claim_limited]
            )
        self.held_back = False
        started = 0
        for claim in claims:
            if started >= want:
                break
            jobs = await claim(
                state.worker_id,
                state.kinds,
                state.queues,
                want - started,
                lease_seconds=state.settings.lease_seconds,
                max_attempts=self.max_attempts,
            )
            if jobs:
                metrics.WORKER_IN_FLIGHT.inc(len(jobs))
            for job in jobs:
                self.runner.start(job)
            started += len(jobs)
        return started

    async def _claim_limited(self, *args: Any, **kwargs: Any) -> list[Job]:
        state = self.state
        if any(kind in self._limited_kinds for _, _, kind in state.pending.values()):
            # This worker's successes not written yet still hold their slots (their keys', the
            # limit's): a claim now would find them full and come back short, then again.
            await state.wait_any(state.outcome_written, timeout=LIMITED_RETRY_SECONDS)
        claim = await self.queue.claim_limited_held(*args, walk_keys=self._walk_keys, **kwargs)
        self.held_back = claim.held_back
        self._walk_keys = claim.keyed
        self._limited_kinds.update(job.kind for job in claim.jobs)
        return claim.jobs

    async def loop(self) -> None:
        """Until a stop is requested."""
        state = self.state
        settings = state.settings
        retry = Retrying()
        while not state.stopping.is_set():
            free = state.concurrency - len(state.runs)
            # Back-pressure: do not pile up unwritten completions while the database is away.
            if free <= 0 or len(state.pending) >= MAX_COMPLETION_BATCH:
                state.slot_freed.clear()
                await state.wait_any(state.slot_freed, timeout=settings.poll_interval_seconds)
                continue
            want = min(free, self.batch_size)
            # Cleared before the claim: a slot freed or a NOTIFY while it runs is not missed.
            state.wake.clear()
            state.slot_freed.clear()
            state.outcome_written.clear()
            try:
                await self._refresh_limited()
                started = await self._claim(want)
            except Exception as exc:
                if not db.is_unavailable(exc):
                    log.exception("claim failed", extra={"worker_id": state.worker_id})
                else:
                    log.warning("database unavailable while claiming: %s", exc)
                await retry.sleep()
                continue
            retry.reset()
            if started < want:
                if self.held_back:
                    # A slot of this worker's own freed in the database (an outcome written)
                    # may be the one the limit was waiting for: try again then, or soon
                    # anyway. Not when a run ends: its success still holds its slot until
                    # written, and a claim then would be held back again.
                    await state.wait_any(state.outcome_written, timeout=LIMITED_RETRY_SECONDS)
                else:
                    await state.wait_any(state.wake, timeout=settings.poll_interval_seconds)
