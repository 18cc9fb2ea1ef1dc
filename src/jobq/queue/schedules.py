"""Periodic schedules in the database: declared by workers, one job per tick.

A schedule's row holds the latest tick enqueued (`last_tick`). `enqueue_tick` moves it forward
and inserts the tick's job in one statement, only when the tick is later than the row's: two
workers enqueuing the same tick wait on each other's row lock and the second, re-reading the
row, finds it no longer qualifies. So each (schedule, tick) is enqueued at most once, by the
database's own locking, whatever the number of workers and whatever their clocks say (the
ticks they compute come from the database's clock). docs/scheduling.md has the whole argument.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from jobq.queue.base import QueueBase
from jobq.queue.inserts import _derived_key
from jobq.queue.model import NEW_JOB_CHANNEL

if TYPE_CHECKING:
    from jobq.periodic import Schedule

# A schedule is listed while a worker declared it within this span; each worker running the
# scheduler declares its schedules again every DECLARE_EVERY. A schedule removed from the
# code (from every worker) thus leaves the listings within a minute.
DECLARE_EVERY = timedelta(seconds=15)
LISTED_FOR = timedelta(seconds=60)
# A schedule no worker declared for this long is deleted; declared again later, it starts
# afresh (from its next tick, with nothing to catch up).
FORGET_AFTER = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    name: str
    kind: str
    queue: str
    spec: str
    last_tick: datetime
    declared_at: datetime


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A schedule as the listings show it."""

    name: str
    kind: str
    queue: str
    spec: str
    next_run_at: datetime | None
    last_run_at: datetime | None  # the tick of the latest job enqueued
    last_job_id: uuid.UUID | None
    declared_at: datetime


_STATES = """
SELECT n.now, s.name, s.kind, s.queue, s.spec, s.last_tick, s.declared_at
FROM (SELECT now() AS now) AS n
LEFT JOIN jobq_schedules AS s ON s.name = ANY($1::text[])
"""

# A schedule declared for the first time starts after `now`: nothing before it is "missed".
# Declared again, it keeps its last tick; next_run_at only ever names a time after it (a
# concurrent tick may have moved it on). Rows in name order: two workers declaring the same
# schedules lock them in the same order.
_DECLARE = """
WITH gone AS (
    DELETE FROM jobq_schedules
    WHERE declared_at < $6::timestamptz - $7::interval AND NOT (name = ANY($1::text[]))
)
INSERT INTO jobq_schedules AS s (name, kind, queue, spec, last_tick, next_run_at, declared_at)
SELECT d.name, d.kind, d.queue, d.spec, $6::timestamptz, d.next_run_at, $6::timestamptz
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
     AS d(name, kind, queue, spec, next_run_at)
ORDER BY d.name
ON CONFLICT (name) DO UPDATE
SET kind = excluded.kind, queue = excluded.queue, spec = excluded.spec,
    declared_at = greatest(s.declared_at, excluded.declared_at),
    next_run_at = CASE WHEN excluded.next_run_at > s.last_tick THEN excluded.next_run_at
                       ELSE s.next_run_at END
"""

_ENQUEUE_TICK = f"""
WITH new AS (
    SELECT jobq_uuid_v7() AS id
), advanced AS (
    UPDATE jobq_schedules
    SET last_tick = $2, next_run_at = $3, last_job_id = (SELECT id FROM new)
    WHERE name = $1 AND last_tick < $2
    RETURNING last_job_id
), ins AS (
    INSERT INTO jobs (id, kind, queue, payload, priority, max_attempts, run_at, concurrency_key)
    SELECT advanced.last_job_id, $4, $5, $6::text::jsonb, $7, $8, $2,
           {_derived_key("NULL::text", "$6::text::json", "$4", "$5", "jobq_flow_controls")}
    FROM advanced
    RETURNING id, queue
)
SELECT id, pg_notify('{NEW_JOB_CHANNEL}', queue)::text AS _notified FROM ins
"""

_LISTED = """
SELECT name, kind, queue, spec, next_run_at, declared_at, last_job_id,
       CASE WHEN last_job_id IS NOT NULL THEN last_tick END AS last_run_at
FROM jobq_schedules
WHERE declared_at > coalesce($1::timestamptz, now()) - $2::interval
ORDER BY name
LIMIT 1000
"""


class Schedules(QueueBase):
    async def schedule_states(
        self, names: Sequence[str]
    ) -> tuple[datetime, dict[str, ScheduleRow]]:
        """The database's now and the stored state of the schedules named."""
        rows = await self.pool.fetch(_STATES, list(names))
        found = {
            r["name"]: ScheduleRow(
                r["name"], r["kind"], r["queue"], r["spec"], r["last_tick"], r["declared_at"]
            )
            for r in rows
            if r["name"] is not None
        }
        return rows[0]["now"], found

    async def declare_schedules(
        self, declared: Sequence[tuple[Schedule, datetime]], *, now: datetime
    ) -> None:
        """Schedules this worker runs, each with its next run; forgets the schedules no
        worker declared for FORGET_AFTER."""
        ordered = sorted(declared, key=lambda d: d[0].name)
        await self.pool.execute(
            _DECLARE,
            [s.name for s, _ in ordered],
            [s.kind for s, _ in ordered],
            [s.queue for s, _ in ordered],
            [s.spec for s, _ in ordered],
            [n for _, n in ordered],
            now,
            FORGET_AFTER,
        )

    async def enqueue_tick(
        self, schedule: Schedule, tick: datetime, next_run: datetime
    ) -> uuid.UUID | None:
        """The job of `schedule` for `tick` (due at the tick), unless this tick or a later one
        was enqueued already; None then."""
        row = await self.pool.fetchrow(
            _ENQUEUE_TICK,
            schedule.name,
            tick,
            next_run,
            schedule.kind,
            schedule.queue,
            schedule.payload_json,
            schedule.priority,
            schedule.max_attempts,
        )
        return None if row is None else row["id"]

    async def schedules(self, *, now: datetime | None = None) -> list[ScheduleInfo]:
        """Schedules some worker declared within LISTED_FOR, by name."""
        rows = await self.pool.fetch(_LISTED, now, LISTED_FOR)
        return [
            ScheduleInfo(
                r["name"], r["kind"], r["queue"], r["spec"], r["next_run_at"],
                r["last_run_at"], r["last_job_id"], r["declared_at"],
            )
            for r in rows
        ]  # fmt: skip
