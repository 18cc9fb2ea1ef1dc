"""Rollup compaction: keeps the rollups behind the operator views small.

The triggers on `jobs` and `jobs_history` only append: a delta row per statement and (queue,
kind, status) to `jobq_count_deltas`, a row per statement and minute to
`jobq_finished_minutes`, so that writers never wait on a shared counter row. A pass folds the
deltas into `jobq_counts`, merges each minute's rows into one per (queue, kind, status), and
forgets minutes older than a day. Readers sum both tables and need no pass to be right: a pass
only keeps what they read small.

One session at a time: a pass that finds another holding the lock skips (it would find
nothing to fold). Workers run it as a maintenance service; the API runs it too (on its
primary, never a read replica), so that the deltas stay small while no worker runs.
"""

from __future__ import annotations

import asyncio
import logging
import random

import asyncpg

from jobq import db

log = logging.getLogger("jobq.maintenance")

# The lock `jobq_counts_rebuild()` takes too: a rebuild and a pass never interleave.
_TRY_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('jobq_counts'))"

# Every delta visible now, summed into the counts; rows a transaction commits meanwhile are
# not in this snapshot, so they stay for the next pass.
_FOLD_DELTAS = """
WITH folded AS (
    DELETE FROM jobq_count_deltas RETURNING queue, kind, status, n
)
INSERT INTO jobq_counts AS c (queue, kind, status, n)
SELECT queue, kind, status, sum(n)::bigint FROM folded
GROUP BY queue, kind, status
HAVING sum(n) <> 0
ON CONFLICT (queue, kind, status) DO UPDATE SET n = c.n + excluded.n
"""

# A count that reached 0 goes (its queue or kind may never come back). A separate statement:
# one statement cannot both update a row and delete it. The table is small (one row per
# queue, kind and status present).
_DROP_ZERO_COUNTS = "DELETE FROM jobq_counts WHERE n = 0"

# The last hour's minutes that have more than one row per (queue, kind, status) become one row
# each. Older minutes get rows only from transactions open for over an hour: they stay as they
# are (still counted right) until they are forgotten.
_MERGE_MINUTES = """
WITH merged AS (
    DELETE FROM jobq_finished_minutes AS f
    USING (
        SELECT minute, queue, kind, status FROM jobq_finished_minutes
        WHERE minute >= date_trunc('minute', now()) - interval '1 hour'
        GROUP BY minute, queue, kind, status
        HAVING count(*) > 1
    ) AS d
    WHERE f.minute = d.minute AND f.queue = d.queue AND f.kind = d.kind AND f.status = d.status
    RETURNING f.minute, f.queue, f.kind, f.status, f.n
)
INSERT INTO jobq_finished_minutes (minute, queue, kind, status, n)
SELECT minute, queue, kind, status, sum(n) FROM merged
GROUP BY minute, queue, kind, status
"""

# The views read at most the last few minutes; a day is kept for whoever looks by hand.
_FORGET_MINUTES = """
DELETE FROM jobq_finished_minutes WHERE minute < now() - interval '1 day'
"""

INTERVAL_SECONDS = 5.0


async def compact(pool: asyncpg.Pool) -> bool:
    """One compaction pass, in one transaction; False when another session held the lock."""
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(_TRY_LOCK):
            return False
        await conn.execute(_FOLD_DELTAS)
        await conn.execute(_DROP_ZERO_COUNTS)
        await conn.execute(_MERGE_MINUTES)
        await conn.execute(_FORGET_MINUTES)
    return True


class RollupCompactor:
    """The maintenance service (see `jobq.maintenance.Service`)."""

    name = "rollups"

    def __init__(self, pool: asyncpg.Pool, *, interval: float = INTERVAL_SECONDS) -> None:
        self.pool = pool
        self.interval = interval

    async def run_once(self) -> None:
        await compact(self.pool)


async def compact_forever(pool: asyncpg.Pool, *, interval: float | None = None) -> None:
    """Compact every `interval` seconds until cancelled (the API's loop; workers run the
    service). A pass that fails is logged, unless the database is unreachable, which the
    API's requests report already; the next pass comes on time."""
    while True:
        await asyncio.sleep((interval or INTERVAL_SECONDS) * random.uniform(0.9, 1.1))
        try:
            await compact(pool)
        except Exception as exc:
            if not db.is_unavailable(exc):
                log.exception("rollup compaction failed")
