"""What unique jobs cost against a batch: 1,000 jobs as `enqueue_many` (one statement), as
1,000 unique `Queue.enqueue` of free keys (one statement each), and as 1,000 unique enqueues
that each meet their key held (duplicates: two statements each) or free to take over (a failed
holder: four statements, the last two in a transaction of its own); medians of 5 runs.

    python -m bench.unique_cost [--admin postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from bench.store import migrated_database
from jobq import db
from jobq.queue import NewJob, Queue

N = 1000
HOUR = timedelta(hours=1)


async def _rate(prepare: Callable[[], Awaitable[Any]], run: Callable[[], Awaitable[Any]]) -> float:
    spans = []
    for _ in range(5):
        await prepare()
        t0 = time.perf_counter()
        await run()
        spans.append(time.perf_counter() - t0)
    return N / statistics.median(spans)


async def main(admin: str) -> None:
    async with migrated_database(admin, "unique_cost") as dsn:
        pool = await db.create_pool(dsn, min_size=1, max_size=2)
        queue = Queue(pool)
        jobs = [NewJob("sync", {"account": i}) for i in range(N)]

        async def empty() -> None:
            await pool.execute("TRUNCATE jobs, jobq_unique_keys")

        async def held() -> None:
            await empty()
            for job in jobs:
                await queue.enqueue(job, unique_for=HOUR)

        async def failed() -> None:
            await held()
            await pool.execute("UPDATE jobs SET status = 'cancelled'")  # holders that count no more

        async def uniques() -> None:
            for job in jobs:
                await queue.enqueue(job, unique_for=HOUR)

        async def batch() -> None:
            await queue.enqueue_many(jobs)

        figures = {
            "enqueue_many of 1,000 (one statement)": await _rate(empty, batch),
            "1,000 unique enqueues, keys free (1 statement each)": await _rate(empty, uniques),
            "1,000 unique enqueues, duplicates (2 statements each)": await _rate(held, uniques),
            "1,000 unique enqueues, take-overs (4 statements each)": await _rate(failed, uniques),
        }
        for what, rate in figures.items():
            print(f"| {what} | {rate:,.0f} jobs/s |")
        await pool.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    asyncio.run(main(p.parse_args().admin))
