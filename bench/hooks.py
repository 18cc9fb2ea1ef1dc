"""What middleware and OpenTelemetry cost when used: drain and enqueue with none, with one
middleware that does nothing, and with OpenTelemetry on (an SDK recording every span,
exporting none), in one run, the variants interleaved round by round; medians.

    python -m bench.hooks [--rounds 5] [--n 10000] [--enqueue-n 2000]

What they cost when not used (the hot path before and after they were added) is
bench/suite_ab.sh, on two revisions. Results in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from bench import store
from bench.suite import (
    RESULTS,
    ROOT,
    child_env,
    enqueue_noops,
    fresh_db,
    server,
    stop_workers,
    wait_until,
)
from jobq import NewJob, Queue, db, middleware
from jobq.middleware import EnqueueNext, Middleware

VARIANTS = {
    # name: worker registry, worker environment
    "none": ("bench.handlers:registry", {}),
    "middleware": ("bench.handlers:with_middleware", {}),
}


def _otel_available() -> bool:
    """jobq has OpenTelemetry (jobq.otel) and the SDK is installed (the dev extra)."""
    try:
        return bool(
            importlib.util.find_spec("jobq.otel") and importlib.util.find_spec("opentelemetry.sdk")
        )
    except ModuleNotFoundError:
        return False


if _otel_available():
    VARIANTS["otel"] = ("bench.otel_handlers:registry", {"JOBQ_OTEL": "1"})


class PassThrough(Middleware):
    async def enqueue(self, jobs: list[NewJob], call_next: EnqueueNext) -> Any:
        return await call_next(jobs)


async def drain(admin: str, variant: str, n: int, concurrency: int) -> float:
    spec, env = VARIANTS[variant]
    async with fresh_db(admin, "hooks") as dsn:
        pool = await db.create_pool(dsn, min_size=1, max_size=2)
        try:
            ids = await enqueue_noops(Queue(pool), n)
            await store.analyze(pool)
            worker = subprocess.Popen(
                [sys.executable, "-m", "jobq", "worker", spec, "--concurrency", str(concurrency)],
                env=child_env(dsn, env),
                cwd=ROOT,
            )
            try:

                async def done() -> bool:
                    return await store.unfinished_count(pool, ids) == 0

                if not await wait_until(done, timeout=600, interval=0.2):
                    raise RuntimeError(f"drain ({variant}) did not finish")
            finally:
                stop_workers([worker])
            row = await store.drain_outcome(pool, ids)
            assert row["once"] == n, row
            return float(n / row["span"])
        finally:
            await pool.close()


async def enqueue(dsn: str, variant: str, n: int) -> float:
    """Sequential `Queue.enqueue` of one job at a time: jobs/s."""
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    own = [PassThrough()] if variant == "middleware" else []
    if variant == "otel":
        from jobq import otel

        otel.instrument()
    try:
        queue = Queue(pool, middleware=own)
        for i in range(50):  # warm the statement cache and the pool
            await queue.enqueue(NewJob("noop", {"i": i}))
        t0 = time.perf_counter()
        for i in range(n):
            await queue.enqueue(NewJob("noop", {"i": i}))
        return n / (time.perf_counter() - t0)
    finally:
        if variant == "otel":
            from jobq import otel

            otel.uninstrument()
        assert not middleware.installed()
        await pool.close()


async def main(a: argparse.Namespace, admin: str) -> None:
    if "otel" in VARIANTS:
        from bench.handlers import otel_sdk

        otel_sdk()  # this process's spans (enqueue, variant otel) are recorded the same way
    results: dict[str, dict[str, list[float]]] = {"drain": {}, "enqueue": {}}
    async with fresh_db(admin, "hooks_enqueue") as dsn:
        for round_ in range(a.rounds):
            order = list(VARIANTS) if round_ % 2 == 0 else list(VARIANTS)[::-1]
            for variant in order:
                rate = await enqueue(dsn, variant, a.enqueue_n)
                results["enqueue"].setdefault(variant, []).append(rate)
                print(json.dumps({"bench": "hooks_enqueue", "variant": variant,
                                  "jobs_per_s": round(rate)}), flush=True)  # fmt: skip
    for round_ in range(a.rounds):
        order = list(VARIANTS) if round_ % 2 == 0 else list(VARIANTS)[::-1]
        for variant in order:
            rate = await drain(admin, variant, a.n, a.concurrency)
            results["drain"].setdefault(variant, []).append(rate)
            print(json.dumps({"bench": "hooks_drain", "variant": variant,
                              "jobs_per_s": round(rate)}), flush=True)  # fmt: skip
    summary = {
        bench: {v: round(statistics.median(rates)) for v, rates in by.items()}
        for bench, by in results.items()
    }
    (RESULTS / "hooks.json").write_text(json.dumps({"rounds": a.rounds, **summary}, indent=2))
    others = [v for v in VARIANTS if v != "none"]
    print("| figure (median jobs/s) | none | " + " | ".join(f"{v} | ratio" for v in others) + " |")
    print("|---|---:|" + "---:|---:|" * len(others))
    for bench, by in summary.items():
        base = by["none"]
        cells = " | ".join(f"{by[v]} | {by[v] / base:.3f}" for v in others)
        print(f"| {bench} | {base} | {cells} |")


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=10000, help="jobs per drain")
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--enqueue-n", type=int, default=2000, help="sequential enqueues per round")
    a = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with server() as admin:
        asyncio.run(main(a, admin))


if __name__ == "__main__":
    run()
