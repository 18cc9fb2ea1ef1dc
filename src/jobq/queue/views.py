"""Operator views: what `GET /stats`, `/metrics`, the dashboard and `jobq status` read.

Every statement reads the rollups (`jobq_counts` + `jobq_count_deltas`, `jobq_finished_minutes`,
kept by triggers on `jobs` and `jobs_history`) or a bounded index probe (LIMIT 1) per queue,
priority or kind they name, never a range of jobs: they cost the same with ten million jobs in
history as with none, and no estimate comes near the JIT thresholds. Whether compaction
(`jobq.maintenance.rollups`) ran lately or not changes how many rollup rows they read, never
their answer. See docs/storage.md, "Operator views in constant time".
"""

from __future__ import annotations

from jobq.queue.base import QueueBase
from jobq.queue.model import FailingKind, MinuteCount, QueueLag, Unhandled

# The count of every (queue, kind, status): the compacted counts plus the deltas appended
# since. A pair whose jobs are all gone sums to 0 and is left out.
_ROLLUP = """
SELECT queue, kind, status, n FROM jobq_counts
UNION ALL
SELECT queue, kind, status, n FROM jobq_count_deltas
"""

_COUNTS = f"""
SELECT queue, status, sum(n)::bigint AS n
FROM ({_ROLLUP}) AS c
GROUP BY queue, status
HAVING sum(n) <> 0
"""

# -- operator views (GET /stats, the dashboard, `jobq status`): one statement each ----------

# Waiting jobs that are due, per queue: how far behind each queue is. The queues with waiting
# jobs come from the rollup; jobs_queue_claim_idx (queue, priority, run_at, id) puts priority
# before run_at, so a loose index scan finds each queue's priorities (one probe each) and one
# probe per (queue, priority) reads its earliest due run_at. Future-dated jobs cost nothing.
# The figure is the longest-waiting due job of the queue, whatever its priority: a job starved
# behind higher priorities shows as lag.
_OLDEST_DUE = f"""
WITH RECURSIVE queues AS (
    SELECT queue FROM ({_ROLLUP}) AS c
    WHERE status IN ('queued', 'retrying')
    GROUP BY queue
    HAVING sum(n) > 0
), priorities AS (
    SELECT q.queue,
           (SELECT min(j.priority) FROM jobs AS j
            WHERE j.status IN ('queued', 'retrying') AND j.queue = q.queue) AS priority
    FROM queues AS q
    UNION ALL
    SELECT p.queue,
           (SELECT min(j.priority) FROM jobs AS j
            WHERE j.status IN ('queued', 'retrying') AND j.queue = p.queue
              AND j.priority > p.priority)
    FROM priorities AS p
    WHERE p.priority IS NOT NULL
)
SELECT p.queue, min(d.run_at) AS oldest_run_at,
       extract(epoch FROM now() - min(d.run_at))::float8 AS age_seconds
FROM priorities AS p
CROSS JOIN LATERAL (
    SELECT j.run_at FROM jobs AS j
    WHERE j.status IN ('queued', 'retrying') AND j.queue = p.queue AND j.priority = p.priority
      AND j.run_at <= now()
    ORDER BY j.run_at
    LIMIT 1
) AS d
WHERE p.priority IS NOT NULL
GROUP BY p.queue
"""

# Jobs that ended in each of the last `$1` minutes (this one included), by final status, one
# row per minute even when nothing finished. Reads the window's rows of jobq_finished_minutes
# (by its minute index): a few per minute and kind once compacted.
_FINISHED_PER_MINUTE = """
WITH finished AS (
    SELECT minute,
           sum(n) FILTER (WHERE status = 'succeeded') AS succeeded,
           sum(n) FILTER (WHERE status = 'failed_permanent') AS failed,
           sum(n) FILTER (WHERE status = 'cancelled') AS cancelled
    FROM jobq_finished_minutes
    WHERE minute >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
      AND minute <= date_trunc('minute', now())
    GROUP BY minute
)
SELECT m.minute,
       coalesce(f.succeeded, 0)::bigint AS succeeded,
       coalesce(f.failed, 0)::bigint AS failed,
       coalesce(f.cancelled, 0)::bigint AS cancelled
FROM generate_series(date_trunc('minute', now()) - make_interval(mins => $1 - 1),
                     date_trunc('minute', now()), interval '1 minute') AS m(minute)
LEFT JOIN finished AS f ON f.minute = m.minute
ORDER BY m.minute
"""

# The first minute of a window of `$1` minutes ending with this one: the minutes
# finished-per-minute shows. A stable expression, so that history leaves finished before it are
# pruned when the statement starts.
_WINDOW_START = "date_trunc('minute', now()) - make_interval(mins => $1 - 1)"

# Kinds with the most failures lately: failed for good in the window (the same minutes as
# finished-per-minute, from its rollup), or waiting to retry now (from the count rollup). The
# latest error per kind comes from one row: the newest failed job of the kind in the window
# (jobs_history_failed by (kind, id), ids in creation order), or the retrying job that failed
# last (jobs_failing_idx), whichever failed later; failed rows that version 3 left in `jobs`
# count too until the upgrade moves them. Probes run only for the kinds shown, in order, so
# the LIMIT stops them; a kind whose rows are gone meanwhile (retried, pruned) is skipped.
_FAILING_KINDS = f"""
WITH failed AS (
    SELECT kind, sum(n) AS n FROM jobq_finished_minutes
    WHERE status = 'failed_permanent' AND minute >= {_WINDOW_START}
    GROUP BY kind
    HAVING sum(n) > 0
), retrying AS (
    SELECT kind, sum(n) AS n FROM ({_ROLLUP}) AS c
    WHERE status = 'retrying'
    GROUP BY kind
    HAVING sum(n) > 0
), ranked AS (
    SELECT kind, coalesce(f.n, 0)::bigint AS failed, coalesce(r.n, 0)::bigint AS retrying
    FROM failed AS f FULL JOIN retrying AS r USING (kind)
    ORDER BY coalesce(f.n, 0) + coalesce(r.n, 0) DESC, kind
)
SELECT k.kind, k.failed, k.retrying, last.last_error, last.id AS last_job_id,
       last.failed_at AS last_failed_at
FROM ranked AS k
CROSS JOIN LATERAL (
    SELECT x.last_error, x.id, x.failed_at FROM (
        (SELECT h.last_error, h.id, h.finished_at AS failed_at
         FROM jobs_history AS h
         WHERE k.failed > 0 AND h.status = 'failed_permanent' AND h.kind = k.kind
           AND h.finished_at >= {_WINDOW_START}
         ORDER BY h.id DESC
         LIMIT 1)
        UNION ALL
        (SELECT j.last_error, j.id, j.updated_at
         FROM jobs AS j
         WHERE j.status IN ('retrying', 'failed_permanent') AND j.kind = k.kind
           AND (j.status = 'retrying' OR j.finished_at >= {_WINDOW_START})
         ORDER BY j.updated_at DESC
         LIMIT 1)
    ) AS x
    ORDER BY x.failed_at DESC
    LIMIT 1
) AS last
LIMIT $2
"""

# Waiting jobs whose kind and queue no live worker takes: they will wait forever. The pairs and
# their counts come from the rollup, and only pairs no live worker takes are probed for their
# oldest job: queued ones by one walk of jobs_pkey in id order (ids are time-ordered by
# creation) that stops at the first match, retrying ones from jobs_failing_idx; each probe only
# when the rollup says the pair has such jobs. History is never read. The walk reads the live
# jobs created before the pair's oldest: nothing when the pair is most of the backlog, the
# whole live table for a rare pair behind a large older backlog (see docs/storage.md).
_UNHANDLED = f"""
WITH waiting AS (
    SELECT queue, kind,
           sum(n) FILTER (WHERE status = 'queued') AS queued,
           sum(n) FILTER (WHERE status = 'retrying') AS retrying
    FROM ({_ROLLUP}) AS c
    WHERE status IN ('queued', 'retrying')
    GROUP BY queue, kind
    HAVING sum(n) > 0
), unhandled AS (
    SELECT w.* FROM waiting AS w
    WHERE NOT EXISTS (
        SELECT 1 FROM jobq_workers AS wk
        WHERE wk.expires_at > now() AND w.kind = ANY(wk.kinds) AND w.queue = ANY(wk.queues))
)
SELECT u.queue, u.kind, (coalesce(u.queued, 0) + coalesce(u.retrying, 0))::bigint AS n,
       oldest.created_at AS oldest_created_at
FROM unhandled AS u
CROSS JOIN LATERAL (
    SELECT min(x.created_at) AS created_at FROM (
        -- The first in line (the claim index's order), not the first by id: a rare kind's
        -- due job must not be found by walking every job enqueued before it (a million
        -- future-dated ones, say).
        (SELECT j.created_at FROM jobs AS j
         WHERE u.queued > 0 AND j.status = 'queued' AND j.queue = u.queue AND j.kind = u.kind
         ORDER BY j.priority, j.run_at, j.id
         LIMIT 1)
        UNION ALL
        (SELECT min(j.created_at) FROM jobs AS j
         WHERE u.retrying > 0 AND j.status = 'retrying' AND j.kind = u.kind
           AND j.queue = u.queue)
    ) AS x
) AS oldest
WHERE oldest.created_at IS NOT NULL
ORDER BY n DESC, u.queue, u.kind
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
        """Kinds with the most jobs failed in the last `minutes` minutes (this one included)
        or now waiting to retry."""
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
