"""The claim's plan before and after the queue-bounded claim (migration 0003), in one run.

Two databases on one embedded server get the same rows: 100,000 due jobs in queue `bulk`,
1,000,000 jobs in `default` due tomorrow, and 250 due jobs in `default`. On each, EXPLAIN
(ANALYZE, BUFFERS) of a claim of 250 for `default`, then of the idle poll that follows (nothing
due left in `default`), inside a transaction that is rolled back. "before" is the schema up to
0002 with the claim statement of that time; "after" is today's schema and `queue._CLAIM`.

    python -m bench.claim_plans            # prints both plans; BENCHMARKS.md quotes them

Then the claim rate of both statements, interleaved on one database holding both indexes:
20,000 due jobs taken in claims of 250, 3 rounds each.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from typing import Any

import asyncpg

from bench.suite import fresh_db, server
from jobq import db, schema
from jobq.queue.leases import _CLAIM
from jobq.queue.model import _JOB_FIELDS

# The claim statement before 0003: one scan of jobs_claim_idx (priority, run_at, id) for all
# queues, filtered by queue and kind.
_CLAIM_BEFORE = f"""
WITH picked AS (
    SELECT id FROM jobs
    WHERE status IN ('queued', 'retrying')
      AND run_at <= now()
      AND kind = ANY($2::text[])
      AND queue = ANY($3::text[])
    ORDER BY priority, run_at, id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs AS j
SET status = 'running',
    attempts = j.attempts + 1,
    started_at = now(),
    updated_at = now(),
    lease_owner = $1,
    lease_token = gen_random_uuid(),
    lease_expires_at = now() + make_interval(secs => $5)
FROM picked
WHERE j.id = picked.id
RETURNING {", ".join("j." + f for f in _JOB_FIELDS)}
"""

_LOAD = """
INSERT INTO jobs (kind, queue, max_attempts, run_at)
SELECT 'noop', $1, 3, now() + make_interval(secs => $3) FROM generate_series(1, $2)
"""


async def _load(dsn: str) -> None:
    conn = await db.connect(dsn)
    try:
        await conn.execute(_LOAD, "bulk", 100_000, -60.0)
        await conn.execute(_LOAD, "default", 1_000_000, 86_400.0)
        await conn.execute(_LOAD, "default", 250, -1.0)
        await conn.execute("VACUUM ANALYZE jobs")
    finally:
        await conn.close()


async def _explain(dsn: str, sql: str, args: tuple[Any, ...]) -> list[str]:
    conn = await db.connect(dsn)
    plans = []
    try:
        tx = conn.transaction()
        await tx.start()
        try:
            for _ in ("claim", "idle poll"):
                rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, *args)
                plans.append("\n".join(r[0] for r in rows))
        finally:
            await tx.rollback()
    finally:
        await conn.close()
    return plans


async def _migrate_to(dsn: str, version: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        # The database arrives migrated; a "before" one gets 0003 undone.
        if version < 3:
            await conn.execute("DROP INDEX jobs_queue_claim_idx")
            await conn.execute(
                "CREATE INDEX jobs_claim_idx ON jobs (priority, run_at, id)"
                " WHERE status IN ('queued', 'retrying')"
            )
            await conn.execute("ALTER TABLE jobs ALTER COLUMN max_attempts SET NOT NULL")
            await conn.execute("DELETE FROM jobq_schema_migrations WHERE version >= 3")
    finally:
        await conn.close()


def _summary(plan: str) -> str:
    exec_ms = re.search(r"Execution Time: ([\d.]+) ms", plan)
    buffers = re.search(r"Buffers: shared hit=(\d+)(?: read=(\d+))?", plan)
    hit = int(buffers[1]) + int(buffers[2] or 0) if buffers else -1
    return f"{float(exec_ms[1]) if exec_ms else -1:.2f} ms, {hit} buffers (top node)"


async def main() -> None:
    base = (["noop"], ["default"], 250, 30.0)
    with server() as admin:
        async with fresh_db(admin, "before") as before, fresh_db(admin, "after") as after:
            await _migrate_to(before, 2)
            started = time.monotonic()
            await asyncio.gather(_load(before), _load(after))
            print(f"loaded 1,100,250 rows into each database in {time.monotonic() - started:.0f}s")
            for label, dsn, sql, args in (
                ("before", before, _CLAIM_BEFORE, ("bench", *base)),
                ("after", after, _CLAIM, ("bench", *base, [], [], 3)),
            ):
                versions = sorted(await _applied(dsn))
                for scenario, plan in zip(
                    ("claim 250", "idle poll"), await _explain(dsn, sql, args), strict=True
                ):
                    print(f"\n=== {label} (migrations {versions}), {scenario}: {_summary(plan)}")
                    print(plan)
        async with fresh_db(admin, "rate") as rate:
            print()
            await _claim_rate(rate)


async def _claim_rate(dsn: str, rounds: int = 3, n: int = 20_000, batch: int = 250) -> None:
    """Claims of `batch` until `n` jobs are taken, the old and the new statement interleaved on
    one database holding both indexes: the drain's claim cost without the worker around it."""
    conn = await db.connect(dsn)
    rates: dict[str, list[float]] = {"before": [], "after": []}
    try:
        await conn.execute(
            "CREATE INDEX IF NOT EXISTS jobs_claim_idx ON jobs (priority, run_at, id)"
            " WHERE status IN ('queued', 'retrying')"
        )
        statements = {
            "before": (_CLAIM_BEFORE, ("bench", ["noop"], ["default"], batch, 30.0)),
            "after": (_CLAIM, ("bench", ["noop"], ["default"], batch, 30.0, [], [], 3)),
        }
        for r in range(rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for label in order:
                sql, args = statements[label]
                await conn.execute("TRUNCATE jobs")
                await conn.execute(_LOAD, "default", n, -1.0)
                await conn.execute("VACUUM ANALYZE jobs")
                started = time.perf_counter()
                taken = 0
                while taken < n:
                    taken += len(await conn.fetch(sql, *args))
                rates[label].append(n / (time.perf_counter() - started))
    finally:
        await conn.close()
    for label, values in rates.items():
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"claim rate {label}: median {sorted(values)[len(values) // 2]:,.0f} jobs/s ({runs})")


async def _applied(dsn: str) -> set[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return await schema.applied(conn)
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
