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
import os
import statistics
import subprocess
import sys
import tempfile
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


def sample(tree: Path, admin: str, a: argparse.Namespace, declare_key: bool) -> dict[str, Any]:
    out = subprocess.run(
        # This file, run by path (the older revision may not have it), over that tree's jobq.
        [sys.executable, __file__, "--measure", admin, "--n", str(a.n),
         "--batches", str(a.batches), *(["--declare-key"] if declare_key else [])],
        cwd=tree, env={**os.environ, "PYTHONPATH": f"{tree / 'src'}:{tree}"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


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
    from bench.suite import BENCH_PG_SETTINGS, server

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("")
    results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="jobq-enqueue-ab-") as tmp:
        trees = {}
        for label, rev in (("before", a.before), ("after", a.after)):
            trees[label] = Path(tmp) / label
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                            str(trees[label]), rev], check=True)  # fmt: skip
        try:
            with server(BENCH_PG_SETTINGS) as admin:
                for i in range(a.rounds):
                    order = ("before", "after") if i % 2 == 0 else ("after", "before")
                    for label in order:
                        declare = a.declare_key and label == "after"
                        rec = {"revision": label, "round": i,
                               **sample(trees[label], admin, a, declare)}  # fmt: skip
                        results[label].append(rec)
                        with a.out.open("a") as f:
                            f.write(json.dumps(rec) + "\n")
                        print(json.dumps(rec), file=sys.stderr, flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False)  # fmt: skip
    print(f"| median of {a.rounds} samples, jobs/s | before | after | after / before |")
    print("|---|---:|---:|---:|")
    for key, title in (("enqueue_jobs_per_s", f"Queue.enqueue x {a.n}, sequential"),
                       ("enqueue_many_jobs_per_s", f"enqueue_many of {a.n}")):  # fmt: skip
        b = statistics.median(r[key] for r in results["before"])
        f = statistics.median(r[key] for r in results["after"])
        print(f"| {title} | {b:.0f} | {f:.0f} | {f / b:.3f} |")


if __name__ == "__main__":
    main()
