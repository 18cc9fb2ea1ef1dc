"""Rows a claim locks when many priorities wait, the claim before and after the
level-by-level pick, interleaved in one run.

One queue holds 20,000 due jobs spread over 1, 10 or 100 priorities; a claim of 250 runs
under EXPLAIN (ANALYZE, BUFFERS) in a transaction rolled back, 7 times per statement.
"Before" locked up to 250 rows for every (queue, priority) pair and kept the best 250; "after"
takes priorities lowest first and stops once 250 are held. Every row locked is a write.

    python -m bench.claim_locks            # BENCHMARKS.md quotes the table
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

from bench.suite import fresh_db, server
from jobq import db
from jobq.queue.leases import _CLAIM

# The pick of the first queue-bounded claim: $4 rows locked per pair, then sorted.
_PICK_PER_PAIR = """), picked AS (
    SELECT c.id
    FROM pairs
    CROSS JOIN LATERAL (
        SELECT id, priority, run_at FROM jobs
        WHERE status IN ('queued', 'retrying') AND queue = pairs.queue
          AND priority = pairs.priority AND run_at <= now()
          AND kind = ANY($2::text[])
        ORDER BY run_at, id
        LIMIT $4
        FOR UPDATE SKIP LOCKED
    ) AS c
    ORDER BY c.priority, c.run_at, c.id
    LIMIT $4
)
"""
_CLAIM_BEFORE = (
    _CLAIM[: _CLAIM.index("), picked AS (")]
    + _PICK_PER_PAIR
    + _CLAIM[_CLAIM.index("UPDATE jobs AS j") :]
)

_LOAD = """
INSERT INTO jobs (kind, queue, priority, run_at)
SELECT 'noop', 'default', g % $1, now() - interval '1 minute' FROM generate_series(1, 20000) AS g
"""


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in _nodes(child))]


async def main() -> None:
    args = ("bench", ["noop"], ["default"], 250, 30.0, [], [], 3)
    print("| priorities waiting | before: rows locked, median ms | after: rows locked, median ms |")
    print("|---|---|---|")
    with server() as admin:
        async with fresh_db(admin, "locks") as dsn:
            conn = await db.connect(dsn)
            try:
                for priorities in (1, 10, 100):
                    await conn.execute("TRUNCATE jobs")
                    await conn.execute(_LOAD, priorities)
                    await conn.execute("VACUUM ANALYZE jobs")
                    times: dict[str, list[float]] = {"before": [], "after": []}
                    locked: dict[str, float] = {}
                    for _ in range(7):
                        for label, sql in (("before", _CLAIM_BEFORE), ("after", _CLAIM)):
                            tx = conn.transaction()
                            await tx.start()
                            try:
                                out = await conn.fetchval(
                                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, *args
                                )
                            finally:
                                await tx.rollback()
                            plan = out[0]
                            assert plan["Plan"]["Actual Rows"] == 250
                            times[label].append(plan["Execution Time"])
                            locked[label] = sum(
                                n["Actual Rows"] * n["Actual Loops"]
                                for n in _nodes(plan["Plan"])
                                if n["Node Type"] == "LockRows"
                            )
                    print(
                        f"| {priorities} | {locked['before']:,.0f}, "
                        f"{statistics.median(times['before']):.1f} | {locked['after']:,.0f}, "
                        f"{statistics.median(times['after']):.1f} |"
                    )
            finally:
                await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
