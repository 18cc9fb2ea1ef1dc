"""Enqueue cost on two revisions, finely interleaved: 1,000 sequential `Queue.enqueue` and
`enqueue_many` of 1,000 jobs, each sample in a process of the revision's own code (and its
own migrations, on a fresh database), revisions alternating sample by sample (ABBA), medians
and after/before.

    python -m bench.enqueue_ab BEFORE_REV AFTER_REV [--rounds 8] [--n 1000] [--batches 10]

`--declare-key`: the after revision's samples first declare a concurrency key path for the
kind (what enqueue costs when the key is derived); without it, nothing is declared (what
enqueue costs to those who use no flow control). Against the embedded PostgreSQL (durable
settings of bench.suite).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent


async def measure(admin: str, n: int, batches: int, declare_key: bool) -> dict[str, Any]:
    import asyncpg

    from jobq import NewJob, Queue, db, schema

    name = f"jobq_enqueue_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f"CREATE DATABASE {name}")
    await conn.close()
    dsn = urlunsplit(urlsplit(admin)._replace(path=f"/{name}"))
    try:
        c = await db.connect(dsn)
        await schema.migrate(c)
        await c.close()
        pool = await db.create_pool(dsn, min_size=1, max_size=2)
        try:
            queue = Queue(pool)
            if declare_key:
                from jobq.queue import Limits

                await queue.declare_limits("bench", {"noop": Limits(key_path=("t",))}, {})
            for i in range(50):
                await queue.enqueue(NewJob("noop", {"i": i, "t": str(i % 10)}))
            t0 = time.perf_counter()
            for i in range(n):
                await queue.enqueue(NewJob("noop", {"i": i, "t": str(i % 10)}))
            single = n / (time.perf_counter() - t0)
            jobs = [NewJob("noop", {"i": i, "t": str(i % 10)}) for i in range(n)]
            await queue.enqueue_many(jobs)
            spans = []
            for _ in range(batches):
                t0 = time.perf_counter()
                await queue.enqueue_many(jobs)
                spans.append(time.perf_counter() - t0)
            many = n / statistics.median(spans)
        finally:
            await pool.close()
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.close()
    return {"enqueue_jobs_per_s": single, "enqueue_many_jobs_per_s": many}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("before", nargs="?")
    p.add_argument("after", nargs="?")
    p.add_argument("--measure", metavar="ADMIN_DSN", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--n", type=int, default=1000, help="jobs per sequential run and per batch")
    p.add_argument("--batches", type=int, default=10, help="enqueue_many calls per sample")
    p.add_argument("--declare-key", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "enqueue-ab.jsonl")
    a = p.parse_args()
    if a.measure:
        print(json.dumps(asyncio.run(measure(a.measure, a.n, a.batches, a.declare_key))))
        return
    if not (a.before and a.after):
        p.error("give BEFORE_REV and AFTER_REV")
    from bench.alternating import alternate, report, run_in_tree

    def sample(label: str, tree: Path, admin: str) -> dict[str, Any]:
        declare = a.declare_key and label == "after"
        return run_in_tree(tree, __file__, ["--measure", admin, "--n", str(a.n), "--batches",
                           str(a.batches), *(["--declare-key"] if declare else [])])  # fmt: skip

    results = alternate(a.before, a.after, a.rounds, a.out, sample)
    report(results, a.rounds, [("enqueue_jobs_per_s", f"Queue.enqueue x {a.n}, sequential"),
                               ("enqueue_many_jobs_per_s", f"enqueue_many of {a.n}")])  # fmt: skip


if __name__ == "__main__":
    main()
