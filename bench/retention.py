"""Retention by leaf versus by DELETE: the same number of history rows removed both ways.

    python -m bench.retention [--rows N] [--dsn postgresql://...]

Makes a scratch database, seeds two day-wide leaves of the done class with N succeeded rows
each (server-side), then removes one leaf's rows with the batched DELETE that `jobq prune`
uses for a horizon inside a leaf, and the other leaf (plus the emptied one) with a cleaner
pass (detach concurrently, counts out, drop). Prints time, WAL (pg_current_wal_insert_lsn)
and what stays on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from jobq import db, schema
from jobq.maintenance import Cleaner
from jobq.queue import Queue, history
from jobq.settings import Settings

SEED = """
INSERT INTO jobs_history (id, kind, queue, payload, status, priority, attempts, max_attempts,
                          run_at, cancel_requested, errors, created_at, started_at, finished_at)
SELECT jobq_uuid_v7(), 'echo', 'default', '{}', 'succeeded', 0, 1, 3, $1, false, '[]', $1, $1, $1
FROM generate_series(1, $2)
"""
SCRATCH = "jobq_bench_retention"


async def main(dsn: str, rows: int) -> None:
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"DROP DATABASE IF EXISTS {SCRATCH} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {SCRATCH}")
    scratch = urlunsplit(urlsplit(dsn)._replace(path=f"/{SCRATCH}"))
    try:
        conn = await db.connect(scratch)
        await schema.migrate(conn)
        await conn.close()
        pool = await db.create_pool(scratch, min_size=2, max_size=4)
        try:
            await _run(pool, rows)
        finally:
            await pool.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {SCRATCH} WITH (FORCE)")
        await admin.close()


async def _wal(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"))


async def _run(pool: asyncpg.Pool, rows: int) -> None:
    now = await pool.fetchval("SELECT now()")
    for days in (20, 10):
        at = now - timedelta(days=days)
        await pool.fetchval("SELECT jobq_history_ensure_partition('done', $1, '1 day')", at)
        await pool.execute(SEED, at, rows)
    await pool.execute("VACUUM ANALYZE jobs_history")
    oldest = min(await history.leaves(pool), key=lambda leaf: leaf.lower)

    wal, start = await _wal(pool), time.perf_counter()
    async with pool.acquire() as conn:
        deleted = await history.delete_rows(conn, oldest, ("succeeded",), now)
    seconds, wal = time.perf_counter() - start, await _wal(pool) - wal
    size = await pool.fetchval("SELECT pg_total_relation_size($1::regclass)", oldest.name)
    print(
        f"batched DELETE: {deleted.rows:,} rows in {deleted.batches} batches, {seconds:.2f} s, "
        f"WAL {wal / 1e6:.1f} MB; the leaf still takes {size / 1e6:.1f} MB"
    )

    wal, start = await _wal(pool), time.perf_counter()
    report = await Cleaner(Queue(pool), Settings(retention=timedelta(days=7))).clean()
    seconds, wal = time.perf_counter() - start, await _wal(pool) - wal
    assert report is not None
    print(
        f"cleaner pass: {len(report.leaves)} leaves ({report.rows:,} rows), "
        f"{report.bytes / 1e6:.1f} MB freed, {seconds:.2f} s, WAL {wal / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL", ""))
    args = parser.parse_args()
    if not args.dsn:
        parser.error("give --dsn or DATABASE_URL (a server where a scratch database can be made)")
    asyncio.run(main(args.dsn, args.rows))
