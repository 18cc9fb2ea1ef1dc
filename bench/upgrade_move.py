"""How long the post-deploy move (migration 0006) takes, per million finished jobs.

Builds a schema-v3 database (migrations 0001-0003) holding `n` finished jobs (default
1,000,000: succeeded, failed_permanent and cancelled 3:1:1, finished over the last 60 days,
so both the one-leaf-per-class part and daily leaves are made), applies the pre-deploy
steps, then times 0006 and 0007 on their own, printing the move's progress as `jobq migrate`
does. Against DATABASE_URL (a server that can
create databases); the database it makes is dropped at the end.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.upgrade_move [n]
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import asyncpg

from jobq import db, schema

_DATABASE = "jobq_bench_upgrade_move"

_SEED = """
INSERT INTO jobs (kind, status, attempts, max_attempts, started_at, finished_at, result,
                  payload, created_at)
SELECT 'k' || (i % 5),
       (ARRAY['succeeded', 'succeeded', 'succeeded', 'failed_permanent', 'cancelled'])[1 + i % 5],
       1, 3, f.at, f.at, '{"ok": true}', '{"n": 1}', f.at
FROM generate_series($1::int, $2::int) AS i
CROSS JOIN LATERAL (SELECT now() - (i % 60) * interval '1 day' AS at) AS f
"""


async def main(n: int) -> None:
    admin = os.environ["DATABASE_URL"]
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {_DATABASE} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {_DATABASE}")
    finally:
        await conn.close()
    dsn = admin.rsplit("/", 1)[0] + "/" + _DATABASE
    target = await db.connect(dsn)
    try:
        await schema.migrate(target, target=3)
        started = time.monotonic()
        for low in range(1, n + 1, 100_000):
            await target.execute(_SEED, low, min(n, low + 99_999))
        await target.execute("VACUUM ANALYZE jobs")
        print(f"seeded {n} finished jobs in {time.monotonic() - started:.1f} s", flush=True)
        await schema.migrate(target, pre_deploy=True)
        move = await _timed(target, 6)
        drop = await _timed(target, None)
        print(f"0006 (move): {move:.1f} s, {n / move:,.0f} jobs/s; 0007 (drop): {drop:.1f} s")
        assert await target.fetchval("SELECT count(*) FROM jobs_history") == n
    finally:
        await target.close()
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {_DATABASE} WITH (FORCE)")
        finally:
            await conn.close()


async def _timed(conn: asyncpg.Connection, target: int | None) -> float:
    started = time.monotonic()
    await schema.migrate(
        conn,
        target=target,
        notice=lambda m, text: print(f"  {time.monotonic() - started:6.1f} s  {text}", flush=True),
    )
    return time.monotonic() - started


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000))
