"""Flow-control benchmarks: what limits, rate limits and fair share cost and whether they hold.

    python -m bench.flow [--only claim,per_key,global,fair,rate] [--quick]

- claim: the plain claim statement with and without its pause/limit filter, alternating in one
  connection over a backlog of 50,000 jobs: what flow control costs a claim when unused.

- per_key: 100 keys x 200 jobs, max_per_key=5, 4 workers x 100: drain rate against the same
  drain without limits (same run, alternating), and the most jobs of one key running at once.
- global: max_concurrency=20, 50 ms jobs, 4 workers x 100: the most running at once and the
  throughput against 20 / 50 ms.
- fair: tenant A has 100,000 queued 10 ms jobs, tenant B enqueues one job a second: B's
  enqueue-to-start latency (p50, p99), fair share on and off.
- rate: rate_limit="50/s", 4 workers: starts per second over 60 s.

Every figure comes from the start and finish times the handlers record themselves
(bench/flow_handlers.py). Runs against DATABASE_URL when set, else an embedded PostgreSQL.
Results: bench/results/flow.jsonl.
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
from pathlib import Path
from typing import Any

from bench.suite import (
    RESULTS,
    child_env,
    fresh_db,
    log,
    pct,
    r,
    server,
    stop_workers,
    wait_until,
)
from jobq import db
from jobq.queue import NewJob, Queue


def start(dsn: str, registry: str, concurrency: int, spans: str) -> subprocess.Popen[bytes]:
    env = child_env(dsn, {"JOBQ_FLOW_SPANS": spans, "JOBQ_POLL_INTERVAL_SECONDS": "0.2"})
    return subprocess.Popen(
        [sys.executable, "-m", "jobq", "worker", f"bench.flow_handlers:{registry}",
         "--concurrency", str(concurrency)],
        env=env,
    )  # fmt: skip


def read_spans(spans: str) -> list[tuple[float, float, str, float]]:
    out = []
    for name in os.listdir(spans):
        for line in Path(spans, name).read_text().splitlines():
            a, b, key, t = line.split()
            out.append((float(a), float(b), key, float(t)))
    return out


def most_at_once(spans: list[tuple[float, float, str, float]]) -> int:
    edges = sorted([(s[0], 1) for s in spans] + [(s[1], -1) for s in spans])
    most = running = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


async def run_drain(
    admin: str, registry: str, jobs: list[NewJob], procs: int, concurrency: int
) -> list[tuple[float, float, str, float]]:
    async with fresh_db(admin, "flow") as dsn:
        pool = await db.create_pool(dsn, min_size=1, max_size=2)
        try:
            queue = Queue(pool)
            for s in range(0, len(jobs), 5000):
                await queue.enqueue_many(jobs[s : s + 5000])
            await pool.execute("ANALYZE jobs")
            with tempfile.TemporaryDirectory(prefix="jobq-flow-") as spans:
                workers = [start(dsn, registry, concurrency, spans) for _ in range(procs)]
                try:
                    await wait_until(
                        lambda: pool.fetchval("SELECT NOT EXISTS (SELECT 1 FROM jobs)"),
                        timeout=900,
                        interval=0.2,
                    )
                finally:
                    stop_workers(workers)
                return read_spans(spans)
        finally:
            await pool.close()


def rate_of(spans: list[tuple[float, float, str, float]]) -> float:
    return len(spans) / (max(s[1] for s in spans) - min(s[0] for s in spans))


async def bench_per_key(admin: str, a: argparse.Namespace) -> dict[str, Any]:
    keys, each = (20, 50) if a.quick else (100, 200)
    jobs = [NewJob("span", {"key": f"k{k}"}, concurrency_key=f"k{k}")
            for i in range(each) for k in range(keys)]  # fmt: skip
    rates: dict[str, list[float]] = {"unlimited": [], "per_key": []}
    worst = 0
    for i in range(a.rounds):
        for reg in ["unlimited", "per_key"] if i % 2 == 0 else ["per_key", "unlimited"]:
            spans = await run_drain(admin, reg, jobs, 4, 100)
            assert len(spans) == len(jobs), (reg, len(spans))
            rates[reg].append(rate_of(spans))
            if reg == "per_key":
                by_key: dict[str, list[tuple[float, float, str, float]]] = {}
                for s in spans:
                    by_key.setdefault(s[2], []).append(s)
                worst = max(worst, *(most_at_once(v) for v in by_key.values()))
            log(f"per_key {reg}: {rates[reg][-1]:.0f} jobs/s")
    un, lim = statistics.median(rates["unlimited"]), statistics.median(rates["per_key"])
    return {"bench": "flow_per_key", "keys": keys, "jobs_per_key": each,
            "unlimited_jobs_per_s": r(un), "per_key_jobs_per_s": r(lim),
            "ratio": r(lim / un, 3), "rounds": rates, "most_per_key_at_once": worst,
            "ok": worst <= 5 and lim / un >= 0.6}  # fmt: skip


async def bench_global(admin: str, a: argparse.Namespace) -> dict[str, Any]:
    n = 1000 if a.quick else 4000
    spans = await run_drain(
        admin, "global20", [NewJob("span", {"ms": 50}) for _ in range(n)], 4, 100
    )
    rate = rate_of(spans)
    most = most_at_once(spans)
    return {"bench": "flow_global", "n": n, "jobs_per_s": r(rate), "ideal_jobs_per_s": 400.0,
            "of_ideal": r(rate / 400.0, 3), "most_at_once": most, "ok": most <= 20}  # fmt: skip


async def bench_rate(admin: str, a: argparse.Namespace) -> dict[str, Any]:
    window = 20.0 if a.quick else 60.0
    n = int(50 * window) + 400
    spans = await run_drain_for(admin, "rate50", [NewJob("span") for _ in range(n)], window + 3)
    starts = sorted(s[0] for s in spans)
    first = starts[0]
    within = [t for t in starts if first <= t < first + window]
    rate = len(within) / window
    # After the first second (the full bucket's burst): the rate the bucket refills at.
    steady = [t for t in starts if first + 1 <= t < first + window]
    steady_rate = len(steady) / (window - 1)
    return {"bench": "flow_rate", "limit_per_s": 50, "window_s": window,
            "starts_per_s": r(rate, 2), "off_by": r(rate / 50 - 1, 4),
            "steady_starts_per_s": r(steady_rate, 2), "ok": abs(rate / 50 - 1) <= 0.05}  # fmt: skip


async def run_drain_for(
    admin: str, registry: str, jobs: list[NewJob], seconds: float
) -> list[tuple[float, float, str, float]]:
    async with fresh_db(admin, "flow") as dsn:
        pool = await db.create_pool(dsn, min_size=1, max_size=2)
        try:
            queue = Queue(pool)
            await queue.enqueue_many(jobs)
            with tempfile.TemporaryDirectory(prefix="jobq-flow-") as spans:
                workers = [start(dsn, registry, 100, spans) for _ in range(4)]
                try:
                    await wait_until(lambda: _started(spans), timeout=60, interval=0.05)
                    await asyncio.sleep(seconds)
                finally:
                    stop_workers(workers)
                return read_spans(spans)
        finally:
            await pool.close()


async def _started(spans: str) -> bool:
    return bool(os.listdir(spans))


async def bench_fair(admin: str, a: argparse.Namespace) -> dict[str, Any]:
    backlog = 20_000 if a.quick else 100_000
    seconds = 10 if a.quick else 30
    out: dict[str, Any] = {"bench": "flow_fair", "backlog": backlog, "b_jobs": seconds}
    for reg in ("fair", "unlimited"):
        async with fresh_db(admin, "flow") as dsn:
            pool = await db.create_pool(dsn, min_size=1, max_size=2)
            try:
                queue = Queue(pool)
                for s in range(0, backlog, 5000):
                    await queue.enqueue_many(
                        [NewJob("span", {"key": "A", "ms": 10}, concurrency_key="A")
                         for _ in range(s, min(backlog, s + 5000))]
                    )  # fmt: skip
                await pool.execute("ANALYZE jobs")
                with tempfile.TemporaryDirectory(prefix="jobq-flow-") as spans:
                    workers = [start(dsn, reg, 20, spans) for _ in range(1)]
                    try:
                        await wait_until(lambda: _started(spans), timeout=60, interval=0.05)
                        for _ in range(seconds):
                            await queue.enqueue(NewJob(
                                "span", {"key": "B", "ms": 10, "t": time.time()},
                                concurrency_key="B"))  # fmt: skip
                            await asyncio.sleep(1.0)
                        await asyncio.sleep(2.0)
                    finally:
                        stop_workers(workers)
                    b = [(s[0] - s[3]) * 1000 for s in read_spans(spans) if s[2] == "B"]
            finally:
                await pool.close()
        label = "on" if reg == "fair" else "off"
        out[f"fair_{label}"] = {
            "b_started": len(b),
            "b_p50_ms": r(pct(b, 50)) if b else None,
            "b_p99_ms": r(pct(b, 99)) if b else None,
            "b_max_ms": r(max(b)) if b else None,
        }
        log(f"fair {label}: {out[f'fair_{label}']}")
    on = out["fair_on"]
    out["ok"] = on["b_started"] == seconds and on["b_p99_ms"] is not None and on["b_p99_ms"] < 200
    return out


def _claim_before(after: str) -> str:
    """The plain claim as it was before flow control: no pause or limit filter."""
    head, rest = after.split("), pairs AS (", 1)
    assert head.lstrip().startswith("WITH RECURSIVE open_queues AS (")
    before = "\nWITH RECURSIVE pairs AS (" + rest
    before = before.replace("FROM open_queues AS q", "FROM unnest($3::text[]) AS q(queue)")
    return before.replace("(SELECT kinds FROM open_kinds)::text[]", "$2::text[]")


async def bench_claim(admin: str, a: argparse.Namespace) -> dict[str, Any]:
    """The plain claim statement before and after its pause/limit filter, alternating in one
    connection, over the same backlog: what "free when unused" costs a claim, in isolation."""
    from jobq.queue.leases import _CLAIM

    before = _claim_before(_CLAIM)
    n = 5_000 if a.quick else 50_000
    rounds = 100 if a.quick else 400
    times: dict[str, list[float]] = {"before": [], "after": []}
    async with fresh_db(admin, "flow") as dsn:
        conn = await db.connect(dsn)
        try:
            pool = await db.create_pool(dsn, min_size=1, max_size=1)
            try:
                await Queue(pool).enqueue_many([NewJob("noop") for _ in range(n)])
            finally:
                await pool.close()
            await conn.execute("ANALYZE jobs")
            args = ("w", ["noop"], ["default"], 250, 30.0, [], [], 3)
            for i in range(rounds):
                for label in ("before", "after") if i % 2 == 0 else ("after", "before"):
                    sql = before if label == "before" else _CLAIM
                    t = time.perf_counter()
                    rows = await conn.fetch(sql, *args)
                    times[label].append((time.perf_counter() - t) * 1000)
                    assert len(rows) == 250
                    await conn.execute(
                        "UPDATE jobs SET status = 'queued', attempts = 0, lease_token = NULL,"
                        " lease_owner = NULL, lease_expires_at = NULL, started_at = NULL"
                        " WHERE id = ANY($1::uuid[])",
                        [row["id"] for row in rows],
                    )
        finally:
            await conn.close()
    mb, ma = statistics.median(times["before"]), statistics.median(times["after"])
    return {"bench": "flow_claim_ab", "backlog": n, "batch": 250, "rounds": rounds,
            "before_median_ms": r(mb, 3), "after_median_ms": r(ma, 3),
            "after_over_before": r(ma / mb, 3), "ok": ma / mb <= 1.03}  # fmt: skip


BENCHES = {
    "claim": bench_claim,
    "per_key": bench_per_key,
    "global": bench_global,
    "fair": bench_fair,
    "rate": bench_rate,
}


async def main(a: argparse.Namespace) -> None:
    with server() as admin:
        for name in a.only.split(","):
            rec = await BENCHES[name](admin, a)
            rec["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            print(json.dumps(rec), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="claim,per_key,global,fair,rate")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "flow.jsonl")
    asyncio.run(main(p.parse_args()))
