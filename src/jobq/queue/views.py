"""Operator views: what `GET /stats`, `/metrics`, the dashboard and `jobq status` read."""

from __future__ import annotations

from jobq.queue.base import QueueBase
from jobq.queue.model import FailingKind, MinuteCount, QueueLag, Unhandled

_COUNTS = """
SELECT queue, status, count(*)::bigint AS n FROM jobs GROUP BY queue, status
"""

# -- operator views (GET /stats, the dashboard, `jobq status`): one statement each ----------

# Waiting jobs that are due, per queue: how far behind each queue is. Reads the claim index.
_OLDEST_DUE = """
SELECT queue, min(run_at) AS oldest_run_at,
       extract(epoch FROM now() - min(run_at))::float8 AS age_seconds
FROM jobs
WHERE status IN ('queued', 'retrying') AND run_at <= now()
GROUP BY queue
"""

# Jobs that ended in each of the last `$1` minutes (this one included), by final status, one
# row per minute even when nothing finished. One range scan of jobs_finished_idx per minute.
_FINISHED_PER_MINUTE = """
WITH minutes AS (
    SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => $1 - 1),
                           date_trunc('minute', now()), interval '1 minute') AS minute
)
SELECT m.minute,
       count(j.id) FILTER (WHERE j.status = 'succeeded')::bigint AS succeeded,
       count(j.id) FILTER (WHERE j.status = 'failed_permanent')::bigint AS failed,
       count(j.id) FILTER (WHERE j.status = 'cancelled')::bigint AS cancelled
FROM minutes AS m
LEFT JOIN jobs AS j
       ON j.finished_at >= m.minute AND j.finished_at < m.minute + interval '1 minute'
GROUP BY m.minute
ORDER BY m.minute
"""

# Kinds with the most failures lately: failed for good in the window, or waiting to retry.
_FAILING_KINDS = """
SELECT kind,
       count(*) FILTER (WHERE status = 'failed_permanent')::bigint AS failed,
       count(*) FILTER (WHERE status = 'retrying')::bigint AS retrying,
       (array_agg(last_error ORDER BY updated_at DESC))[1] AS last_error,
       (array_agg(id ORDER BY updated_at DESC))[1] AS last_job_id,
       max(updated_at) AS last_failed_at
FROM jobs
WHERE (status = 'failed_permanent' AND finished_at >= now() - make_interval(mins => $1))
   OR status = 'retrying'
GROUP BY kind
ORDER BY count(*) DESC, kind
LIMIT $2
"""

# Waiting jobs whose kind and queue no live worker takes: they will wait forever.
_UNHANDLED = """
SELECT j.queue, j.kind, count(*)::bigint AS n, min(j.created_at) AS oldest_created_at
FROM jobs AS j
WHERE j.status IN ('queued', 'retrying')
  AND NOT EXISTS (
      SELECT 1 FROM jobq_workers AS w
      WHERE w.expires_at > now() AND j.kind = ANY(w.kinds) AND j.queue = ANY(w.queues))
GROUP BY j.queue, j.kind
ORDER BY n DESC, j.queue, j.kind
"""


class Views(QueueBase):
    async def counts(self) -> list[tuple[str, str, int]]:
        """(queue, status, count) for every pair present."""
        rows = await self.pool.fetch(_COUNTS)
        return [(r["queue"], r["status"], r["n"]) for r in rows]

    async def oldest_due(self) -> list[QueueLag]:
        """Per queue with due jobs waiting: the oldest one's due time and age."""
        rows = await self.pool.fetch(_OLDEST_DUE)
        return [QueueLag(r["queue"], r["oldest_run_at"], r["age_seconds"]) for r in rows]

    async def finished_per_minute(self, minutes: int = 15) -> list[MinuteCount]:
        """Jobs that ended in each of the last `minutes` minutes (this one included), oldest
        first, by final status."""
        rows = await self.pool.fetch(_FINISHED_PER_MINUTE, minutes)
        return [MinuteCount(r["minute"], r["succeeded"], r["failed"], r["cancelled"]) for r in rows]

    async def failing_kinds(self, minutes: int = 15, limit: int = 5) -> list[FailingKind]:
        """Kinds with the most jobs failed in the last `minutes` or now waiting to retry."""
        rows = await self.pool.fetch(_FAILING_KINDS, minutes, limit)
        return [
            FailingKind(
                r["kind"],
                r["failed"],
                r["retrying"],
                r["last_error"],
                r["last_job_id"],
                r["last_failed_at"],
            )
            for r in rows
        ]

    async def unhandled(self) -> list[Unhandled]:
        """Waiting jobs, by queue and kind, that no live worker would claim."""
        rows = await self.pool.fetch(_UNHANDLED)
        return [Unhandled(r["queue"], r["kind"], r["n"], r["oldest_created_at"]) for r in rows]
