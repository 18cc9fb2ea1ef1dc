"""What the rollup triggers cost a drain: the queue core's claim (250) + complete_many loop,
SQL only (no worker), with the triggers on `jobs` and `jobs_history` enabled vs disabled
(`ALTER TABLE ... DISABLE TRIGGER USER`), rounds alternating which goes first; medians.

    python -m bench.rollup_triggers URL_OF_A_SCRATCH_DATABASE [--n 20000] [--rounds 3]

The database is migrated and its jobs are deleted: never point it at one that matters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import asyncpg

from jobq import NewJob, Queue, db, schema
from jobq.queue import lease_of

BATCH = 250
TABLES = ("jobs", "jobs_history")


async def triggers(conn: asyncpg.Connection, enabled: bool) -> None:
    for table in TABLES:
        await conn.execute(f"ALTER TABLE {table} {'ENABLE' if enabled else 'DISABLE'} TRIGGER USER")


async def drain_once(pool: asyncpg.Pool, n: int, enabled: bool) -> dict[str, Any]:
    async with pool.acquire() as conn:
        await triggers(conn, True)
        await conn.execute(
            "TRUNCATE jobs, jobs_history, jobq_counts, jobq_count_deltas, jobq_finished_minutes"
        )
    queue = Queue(pool)
    for s in range(0, n, 5000):
        await queue.enqueue_many([NewJob("noop", {"i": i}) for i in range(s, min(n, s + 5000))])
    async with pool.acquire() as conn:
        await conn.execute("VACUUM ANALYZE jobs")
        await triggers(conn, enabled)
        lsn0 = await conn.fetchval("SELECT pg_current_wal_lsn()")
    done = 0
    started = time.perf_counter()
    while True:
        jobs = await queue.claim("bench", ["noop"], ["default"], BATCH, lease_seconds=60)
        if not jobs:
            break
        completions = await queue.complete_many([(lease_of(j), "null") for j in jobs])
        done += len(completions.held)
    seconds = time.perf_counter() - started
    async with pool.acquire() as conn:
        wal = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", lsn0)
        await triggers(conn, True)
    return {
        "triggers": enabled,
        "jobs": done,
        "jobs_per_s": round(done / seconds, 1),
        "wal_bytes_per_job": round(float(wal) / max(done, 1), 1),
        "ok": done == n,
    }


async def main(a: argparse.Namespace) -> None:
    conn = await db.connect(a.url)
    await schema.migrate(conn)
    await conn.close()
    pool = await db.create_pool(a.url, min_size=1, max_size=2)
    results: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    try:
        for round_no in range(a.rounds):
            order = (True, False) if round_no % 2 == 0 else (False, True)
            for enabled in order:
                rec = await drain_once(pool, a.n, enabled)
                results[enabled].append(rec)
                print(json.dumps({"bench": "rollup_triggers", "round": round_no, **rec}))
    finally:
        await pool.close()
    on = statistics.median(r["jobs_per_s"] for r in results[True])
    off = statistics.median(r["jobs_per_s"] for r in results[False])
    wal_on = statistics.median(r["wal_bytes_per_job"] for r in results[True])
    wal_off = statistics.median(r["wal_bytes_per_job"] for r in results[False])
    summary = {
        "bench": "rollup_triggers",
        "median_jobs_per_s_on": on,
        "median_jobs_per_s_off": off,
        "overhead_pct": round(100 * (off - on) / off, 1),
        "median_wal_bytes_per_job_on": wal_on,
        "median_wal_bytes_per_job_off": wal_off,
        "ok": all(r["ok"] for rs in results.values() for r in rs),
    }
    print(json.dumps(summary))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3)
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))
