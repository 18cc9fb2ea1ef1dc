"""What the limit gauges cost a scrape: `Queue.limit_usage` (the statement GET /metrics and
GET /stats run) over a 200,000-job backlog with 200 running, with no limit and with two, and
`Queue.counts` beside it; medians of 200 calls, then the EXPLAIN.

    python -m bench.limit_usage [--admin postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.store import migrated_database
from jobq import db
from jobq.queue import Limits, NewJob, Queue
from jobq.queue.flow import _USAGE


async def _median_ms(call: Callable[[], Awaitable[Any]], n: int = 200) -> float:
    spans = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        spans.append(time.perf_counter() - t0)
    return statistics.median(spans) * 1000


async def main(admin: str) -> None:
    async with migrated_database(admin, "limit_usage") as dsn:
        pool = await db.create_pool(dsn, min_size=1, max_size=4)
        queue = Queue(pool)
        for _ in range(40):
            await queue.enqueue_many(
                [NewJob("a", {"i": i}, concurrency_key=f"t{i % 500}") for i in range(5000)]
            )
        await queue.claim("w", ["a"], ["default"], 200, lease_seconds=600)
        await pool.execute("ANALYZE")
        unlimited = await _median_ms(queue.limit_usage)
        await queue.declare_limits(
            "w", {"a": Limits(max_concurrency=1000, max_per_key=5)}, {"default": Limits(fair=True)}
        )
        limited = await _median_ms(queue.limit_usage)
        counts = await _median_ms(queue.counts)
        print(
            f"limit_usage, median ms: no limit {unlimited:.3f}; two limits, 200 running of"
            f" 200,000 jobs {limited:.3f}; counts() {counts:.3f}"
        )
        for row in await pool.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + _USAGE):
            print(row[0])
        await pool.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    asyncio.run(main(p.parse_args().admin))
