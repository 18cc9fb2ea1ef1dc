"""The limited claim with many concurrency keys: how long one claim takes with 1,000 and 20,000
keys waiting (max_per_key=5, 2 jobs per key, one queue).

    python -m bench.flow_keys [--keys 1000,20000] [--rounds 30] [--label NAME]

Each round claims 100 jobs with `Queue.claim_limited` and puts them back (queued, no attempt),
so every round sees the same backlog. For another revision's figure, run it with that
revision's src/ first on PYTHONPATH (the bench only uses the public Queue API). Results:
bench/results/flow-keys.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.suite import RESULTS, fresh_db, r, server
from jobq import db
from jobq.queue import Limits, NewJob, Queue


async def bench_keys(admin: str, keys: int, rounds: int) -> dict[str, Any]:
    async with fresh_db(admin, "flowkeys") as dsn:
        pool = await db.create_pool(dsn, min_size=1, max_size=2)
        try:
            queue = Queue(pool)
            await queue.declare_limits("bench", {"span": Limits(max_per_key=5)}, {})
            jobs = [
                NewJob("span", concurrency_key=f"k{k:06d}") for _ in range(2) for k in range(keys)
            ]
            for s in range(0, len(jobs), 5000):
                await queue.enqueue_many(jobs[s : s + 5000])
            await pool.execute("ANALYZE jobs")
            times: list[float] = []
            got: list[int] = []
            for _ in range(rounds):
                t = time.perf_counter()
                claimed = await queue.claim_limited(
                    "bench", ["span"], ["default"], 100, lease_seconds=30
                )
                times.append((time.perf_counter() - t) * 1000)
                got.append(len(claimed))
                await pool.execute(
                    "UPDATE jobs SET status = 'queued', attempts = 0, lease_token = NULL,"
                    " lease_owner = NULL, lease_expires_at = NULL, started_at = NULL"
                    " WHERE id = ANY($1::uuid[])",
                    [j.id for j in claimed],
                )
        finally:
            await pool.close()
    return {"bench": "flow_claim_keys", "keys": keys, "rounds": rounds, "batch": 100,
            "median_ms": r(statistics.median(times), 2), "min_ms": r(min(times), 2),
            "max_ms": r(max(times), 2), "median_claimed": statistics.median(got)}  # fmt: skip


async def main(a: argparse.Namespace) -> None:
    with server() as admin:
        for keys in (int(k) for k in a.keys.split(",")):
            rec = await bench_keys(admin, keys, a.rounds)
            rec["label"] = a.label
            rec["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            print(json.dumps(rec), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--keys", default="1000,20000")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--label", default="")
    p.add_argument("--out", type=Path, default=RESULTS / "flow-keys.jsonl")
    asyncio.run(main(p.parse_args()))
