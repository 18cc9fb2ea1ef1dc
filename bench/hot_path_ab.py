"""The hot path on two revisions, finely interleaved: sequential enqueue and a drain by one
worker, each sample in a process of the revision's own code (and its own migrations, on a
fresh database), revisions alternating sample by sample (ABBA), medians and after/before.

    python -m bench.hot_path_ab BEFORE_REV AFTER_REV [--rounds 8] [--n 10000] [--enqueue-n 1000]

Meant for a shared, noisy machine: a sample takes seconds, so load that drifts over minutes
touches both revisions alike (bench/suite_ab.sh runs the whole suite per revision instead).
Against the embedded PostgreSQL (durable settings of bench.suite), or DATABASE_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent


# -- one sample, in a process running one revision's code ----------------------------------


async def measure(admin: str, n: int, enqueue_n: int, concurrency: int) -> dict[str, Any]:
    import asyncpg

    from jobq import NewJob, Queue, db, schema

    name = f"jobq_hotpath_{uuid.uuid4().hex[:8]}"
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
            for i in range(50):
                await queue.enqueue(NewJob("noop", {"i": i}))
            t0 = time.perf_counter()
            for i in range(enqueue_n):
                await queue.enqueue(NewJob("noop", {"i": i}))
            enqueue_rate = enqueue_n / (time.perf_counter() - t0)
            ids: list[uuid.UUID] = []
            for s in range(0, n, 5000):
                ids += await queue.enqueue_many(
                    [NewJob("noop", {"i": i}) for i in range(s, min(n, s + 5000))]
                )
            await pool.execute("ANALYZE")
            worker = subprocess.Popen(
                [sys.executable, "-m", "jobq", "worker", "bench.handlers:registry",
                 "--concurrency", str(concurrency)],
                env={**os.environ, "DATABASE_URL": dsn, "JOBQ_LOG_LEVEL": "WARNING"},
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 600
                while await pool.fetchval("SELECT count(*) FROM jobs") > 0:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the drain did not finish")
                    await asyncio.sleep(0.2)
            finally:
                worker.terminate()
                worker.wait(30)
            span = await pool.fetchval(
                "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8"
                " FROM jobs_history WHERE id = ANY($1::uuid[]) AND status = 'succeeded'",
                ids,
            )
            done = await pool.fetchval(
                "SELECT count(*) FROM jobs_history WHERE id = ANY($1::uuid[])"
                " AND status = 'succeeded'",
                ids,
            )
            assert done == n, done
        finally:
            await pool.close()
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.close()
    return {"enqueue_jobs_per_s": enqueue_rate, "drain_jobs_per_s": n / span}


# -- the orchestrator ----------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("before", nargs="?")
    p.add_argument("after", nargs="?")
    p.add_argument("--measure", metavar="ADMIN_DSN", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--n", type=int, default=10000, help="jobs per drain")
    p.add_argument("--enqueue-n", type=int, default=1000, help="sequential enqueues per sample")
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hot-path-ab.jsonl")
    a = p.parse_args()
    if a.measure:
        print(json.dumps(asyncio.run(measure(a.measure, a.n, a.enqueue_n, a.concurrency))))
        return
    if not (a.before and a.after):
        p.error("give BEFORE_REV and AFTER_REV")
    from bench.alternating import alternate, report, run_in_tree

    def sample(label: str, tree: Path, admin: str) -> dict[str, Any]:
        return run_in_tree(tree, __file__, ["--measure", admin, "--n", str(a.n), "--enqueue-n",
                           str(a.enqueue_n), "--concurrency", str(a.concurrency)])  # fmt: skip

    results = alternate(a.before, a.after, a.rounds, a.out, sample)
    rows = [("enqueue_jobs_per_s", "sequential enqueue"),
            ("drain_jobs_per_s", f"drain, 1 worker x {a.concurrency}")]  # fmt: skip
    report(results, a.rounds, rows)


if __name__ == "__main__":
    main()
