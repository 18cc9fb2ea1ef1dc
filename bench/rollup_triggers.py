"""What the rollup triggers cost a drain: the queue core's claim (250) + complete_many loop,
SQL only (no worker), with the triggers on `jobs` and `jobs_history` enabled vs disabled
(`ALTER TABLE ... DISABLE TRIGGER USER`), rounds alternating which goes first; medians. On a
shared machine the wall-clock ratio is noisy, so the time PostgreSQL spent in the trigger
functions themselves is also reported (`track_functions = 'pl'`, pg_stat_user_functions),
as a share of the drain's wall-clock time.

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


_TRIGGER_MS = """
SELECT coalesce(sum(total_time), 0)::float8 FROM pg_stat_user_functions
WHERE funcname IN ('jobq_count_inserted', 'jobq_count_updated', 'jobq_count_deleted')
"""


async def trigger_ms(url: str) -> float:
    conn = await db.connect(url)
    try:
        ms: float = await conn.fetchval(_TRIGGER_MS)
        return ms
    finally:
        await conn.close()


async def drain_once(url: str, n: int, enabled: bool) -> dict[str, Any]:
    # Pools of their own for the setup and the drain: a session flushes its function
    # statistics when it ends, so the drain's trigger time is read after its pool closed.
    pool = await db.create_pool(url, min_size=1, max_size=2)
    try:
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
    finally:
        await pool.close()
    ms0 = await trigger_ms(url)
    pool = await db.create_pool(url, min_size=1, max_size=2)
    try:
        queue = Queue(pool)
        lsn0 = await pool.fetchval("SELECT pg_current_wal_lsn()")
        done = 0
        started = time.perf_counter()
        while True:
            jobs = await queue.claim("bench", ["noop"], ["default"], BATCH, lease_seconds=60)
            if not jobs:
                break
            completions = await queue.complete_many([(lease_of(j), "null") for j in jobs])
            done += len(completions.held)
        seconds = time.perf_counter() - started
        wal = await pool.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", lsn0)
        async with pool.acquire() as conn:
            await triggers(conn, True)
    finally:
        await pool.close()
    in_triggers = await trigger_ms(url) - ms0
    return {
        "triggers": enabled,
        "jobs": done,
        "jobs_per_s": round(done / seconds, 1),
        "trigger_ms": round(in_triggers, 1),
        "trigger_share_pct": round(100 * in_triggers / 1000 / seconds, 1),
        # The whole server's WAL: other writers on the server count too.
        "wal_bytes_per_job": round(float(wal) / max(done, 1), 1),
        "ok": done == n,
    }


async def main(a: argparse.Namespace) -> None:
    conn = await db.connect(a.url)
    await schema.migrate(conn)
    dbname = await conn.fetchval("SELECT current_database()")
    await conn.execute(f"ALTER DATABASE \"{dbname}\" SET track_functions = 'pl'")
    await conn.close()
    results: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for round_no in range(a.rounds):
        order = (True, False) if round_no % 2 == 0 else (False, True)
        for enabled in order:
            rec = await drain_once(a.url, a.n, enabled)
            results[enabled].append(rec)
            print(json.dumps({"bench": "rollup_triggers", "round": round_no, **rec}), flush=True)
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
        "median_trigger_share_pct_on": statistics.median(
            r["trigger_share_pct"] for r in results[True]
        ),
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
