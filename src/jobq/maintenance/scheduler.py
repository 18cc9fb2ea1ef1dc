"""The scheduler: enqueues the periodic jobs the registry declares (`Registry.periodic`).

Every worker whose registry declares schedules runs it; none is elected. A pass reads the
database's now and each schedule's last tick in one statement, and for a schedule whose
latest tick is due (`Schedule.due`: later than the last tick, within its catch-up window)
enqueues it with `Queue.enqueue_tick`, which does so at most once per tick across all
workers. Between ticks a pass is that one read; a worker with no schedules runs no pass at
all. docs/scheduling.md has the semantics and the exactly-once argument.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

from jobq.periodic import Schedule, pass_interval
from jobq.queue import Queue
from jobq.queue.schedules import DECLARE_EVERY, LISTED_FOR

log = logging.getLogger("jobq.worker")


class Scheduler:
    name = "scheduler"

    def __init__(
        self,
        queue: Queue,
        schedules: Sequence[Schedule],
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.queue = queue
        self.schedules = list(schedules)
        self.interval = pass_interval(self.schedules)
        # Tests drive time; otherwise now is the database's, the one clock all workers share.
        self.clock = clock
        # Per schedule: the last tick seen and the next tick after it, so that a pass between
        # ticks computes nothing.
        self._upcoming: dict[str, tuple[datetime, datetime]] = {}
        # Schedules found declared differently by another worker, said once each.
        self._warned: set[str] = set()

    async def run_once(self) -> None:
        await self.tick()

    async def tick(self) -> list[uuid.UUID]:
        """One pass; the ids of the jobs this pass enqueued."""
        db_now, rows = await self.queue.schedule_states([s.name for s in self.schedules])
        now = self.clock() if self.clock is not None else db_now
        stale = [
            s
            for s in self.schedules
            if (row := rows.get(s.name)) is None
            or (row.spec, row.kind, row.queue) != (s.spec, s.kind, s.queue)
            or row.declared_at <= now - DECLARE_EVERY
        ]
        for s in stale:
            row = rows.get(s.name)
            if (
                row is not None
                and (row.spec, row.kind, row.queue) != (s.spec, s.kind, s.queue)
                and row.declared_at > now - LISTED_FOR
                and s.name not in self._warned
            ):
                # Expected for a minute of a rolling deploy that changes the schedule; for
                # longer, two apps declare one name and share its ticks: one of them never runs.
                self._warned.add(s.name)
                log.warning(
                    "schedule %r is declared differently by another worker: %s of %s on %s"
                    " there, %s of %s on %s here; workers that share a schedule's name share"
                    " its ticks, so give each schedule its own name=",
                    s.name, row.spec, row.kind, row.queue, s.spec, s.kind, s.queue,
                    extra={"service": self.name, "schedule": s.name},
                )  # fmt: skip
        if stale:
            await self.queue.declare_schedules(
                [(s, self._next_run(s, rows[s.name].last_tick if s.name in rows else now, now))
                 for s in stale],
                now=now,
            )  # fmt: skip
        enqueued = []
        for s in self.schedules:
            row = rows.get(s.name)
            if row is None:
                continue  # declared just now: its first tick is after now
            seen = self._upcoming.get(s.name)
            if seen is not None and seen[0] == row.last_tick and now < seen[1]:
                continue
            tick = s.due(row.last_tick, now)
            if tick is None:
                self._upcoming[s.name] = (row.last_tick, self._next_run(s, row.last_tick, now))
                continue
            following = s.next_after(tick)
            job_id = await self.queue.enqueue_tick(s, tick, following)
            # Enqueued here or by another worker: either way this tick is done.
            self._upcoming[s.name] = (tick, following)
            if job_id is not None:
                enqueued.append(job_id)
                log.info(
                    "periodic job enqueued",
                    extra={"service": self.name, "schedule": s.name, "kind": s.kind,
                           "tick": tick.isoformat(), "job_id": str(job_id)},
                )  # fmt: skip
        return enqueued

    @staticmethod
    def _next_run(s: Schedule, last_tick: datetime, now: datetime) -> datetime:
        """The next tick to run: the first after the last one that is still in the window."""
        return s.next_after(max(last_tick, now - s.catch_up))
