"""The hot path of whichever jobq is imported: plain enqueue, claim and complete.

    PYTHONPATH=<tree>/src:. python -m bench.hotpath --label before [--rounds 5]

Used by bench/hotpath_ab.sh to compare two revisions in one run (this file runs against each
revision's own `jobq` package: it uses only what both have). One fresh database per round,
migrated by the imported jobq; one JSON line per measurement, medians over the rounds last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from typing import Any

import asyncpg

from bench.suite import with_database
from jobq import NewJob, Queue, db, schema
from jobq.queue import lease_of


async def one_round(admin: str, n: int) -> dict[str, float]:
    name = f"jobq_hot_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f"CREATE DATABASE {name}")
    await conn.close()
    dsn = with_database(admin, name)
    try:
        c = await db.connect(dsn)
        await schema.migrate(c)
        await c.close()
        pool = await db.create_pool(dsn, min_size=20, max_size=20)
        queue = Queue(pool)
        out: dict[str, float] = {}
        t = time.perf_counter()
        for i in range(n):
            await queue.enqueue(NewJob("noop", {"i": i}))
        out["enqueue_sequential_per_s"] = n / (time.perf_counter() - t)

        async def task(k: int) -> None:
            for i in range(n // 20):
                await queue.enqueue(NewJob("noop", {"k": k, "i": i}))

        t = time.perf_counter()
        await asyncio.gather(*(task(k) for k in range(20)))
        out["enqueue_concurrent_per_s"] = (n // 20 * 20) / (time.perf_counter() - t)
        total = await pool.fetchval("SELECT count(*) FROM jobs")
        done = 0
        t = time.perf_counter()
        while done < total:
            jobs = await queue.claim("hot", ["noop"], ["default"], 100, lease_seconds=60)
            if not jobs:
                break
            await queue.complete_many([(lease_of(j), "null") for j in jobs])
            done += len(jobs)
        out["claim_complete_per_s"] = done / (time.perf_counter() - t)
        await pool.close()
        return out
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.close()


async def main(a: argparse.Namespace) -> None:
    rounds: list[dict[str, float]] = []
    for i in range(a.rounds):
        rec = await one_round(a.dsn, a.n)
        rounds.append(rec)
        print(json.dumps({"bench": "hotpath", "label": a.label, "round": i, **rec}), flush=True)
    medians: dict[str, Any] = {k: round(statistics.median(r[k] for r in rounds), 1)
                               for k in rounds[0]}  # fmt: skip
    print(json.dumps({"bench": "hotpath", "label": a.label, "median": True, **medians}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--dsn", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-n", type=int, default=2000)
    asyncio.run(main(p.parse_args()))
    sys.exit(0)
