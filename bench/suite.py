"""jobq's benchmark suite: drain, enqueue, latency, scale and memory.

    python -m bench.suite [--only drain,enqueue,latency,scale,memory] [--quick]

Runs against DATABASE_URL when set, otherwise against a fresh embedded PostgreSQL in a
temporary directory (fsync and synchronous_commit on). Every benchmark gets a database of its
own, migrated with jobq's migrations. Each measurement is one JSON line on stdout (and in
--out); a readable table follows at the end. Worker processes are real `jobq worker` processes
running `bench.handlers:registry`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench import store
from jobq import NewJob, Queue, db, schema
from jobq.embedded import EmbeddedPostgres
from jobq.queue import lease_of
from jobq.queue.leases import _CLAIM

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# The embedded server for benchmarks: durable (fsync, synchronous_commit and full_page_writes
# stay on), enough memory to keep the data set cached, no checkpoint inside a measurement.
BENCH_PG_SETTINGS = {
    "shared_buffers": "1GB",
    "wal_buffers": "64MB",
    "max_wal_size": "8GB",
    "min_wal_size": "1GB",
    "checkpoint_timeout": "30min",
    "jit": "off",
    "random_page_cost": "1.1",
    "max_parallel_workers_per_gather": "0",
    "autovacuum_naptime": "10s",
    "work_mem": "16MB",
    "maintenance_work_mem": "256MB",
}

RECORDS: list[dict[str, Any]] = []
OUT: Path | None = None


def emit(rec: dict[str, Any]) -> None:
    RECORDS.append(rec)
    line = json.dumps(rec, default=str)
    print(line, flush=True)
    if OUT is not None:
        with OUT.open("a") as f:
            f.write(line + "\n")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    """Linear-interpolated percentile, p in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def r(x: float, nd: int = 1) -> float:
    return round(x, nd)


# -- database ---------------------------------------------------------------------------------


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.contextmanager
def server(settings: dict[str, str] | None = None, port: int = 54329) -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="jobq-bench-") as tmp:
        pg = EmbeddedPostgres(Path(tmp), settings=settings or BENCH_PG_SETTINGS, port=port)
        dsn = pg.start()
        try:
            yield dsn
        finally:
            pg.stop()


@contextlib.asynccontextmanager
async def fresh_db(admin_dsn: str, label: str) -> AsyncIterator[str]:
    name = f"jobq_bench_{label}_{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute("CHECKPOINT")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    dsn = with_database(admin_dsn, name)
    c = await db.connect(dsn)
    try:
        await schema.migrate(c)
    finally:
        await c.close()
    try:
        yield dsn
    finally:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


async def machine_info(dsn: str) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SHOW server_version")
        names = [
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "shared_buffers",
            "max_wal_size",
            "checkpoint_timeout",
            "wal_level",
            "jit",
        ]
        settings = {n: await conn.fetchval(f"SHOW {n}") for n in names}
    finally:
        await conn.close()
    from importlib.metadata import version as pkg_version

    return {
        "bench": "machine",
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gb": r(mem_gb),
        "python": platform.python_version(),
        "jobq": pkg_version("jobq"),
        "asyncpg": pkg_version("asyncpg"),
        "postgres": version,
        "pg_settings": settings,
        "database": "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# -- worker processes -------------------------------------------------------------------------


def child_env(dsn: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a `jobq` child process: this tree's jobq and handlers, quiet logs."""
    return {
        **os.environ,
        "DATABASE_URL": dsn,
        "JOBQ_LOG_LEVEL": "WARNING",
        # This checkout's code, also when another checkout is installed in the virtualenv
        # (bench/storage_ab.sh runs two revisions with one virtualenv).
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
        **(extra or {}),
    }


def start_worker(
    dsn: str, concurrency: int, *, grace: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = child_env(dsn, env)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobq",
            "worker",
            "bench.handlers:registry",
            "--concurrency",
            str(concurrency),
            "--shutdown-grace",
            str(grace),
        ],
        env=env,
        cwd=ROOT,
    )


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextlib.asynccontextmanager
async def api_process(dsn: str, port: int) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A real `jobq api` on 127.0.0.1:port, accepting connections when this yields."""
    with contextlib.suppress(OSError):
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
        raise RuntimeError(f"port {port} is already in use (a leftover `jobq api`?)")
    api = subprocess.Popen(
        [sys.executable, "-m", "jobq", "api", "--port", str(port)], env=child_env(dsn), cwd=ROOT
    )
    try:
        for _ in range(400):
            if api.poll() is not None:
                raise RuntimeError(f"`jobq api` exited with {api.returncode}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        yield api
    finally:
        api.send_signal(signal.SIGTERM)
        try:
            api.wait(30)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait()


async def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return True
        await asyncio.sleep(interval)
    return False


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- drain ------------------------------------------------------------------------------------


async def enqueue_noops(queue: Queue, n: int, chunk: int = 5000) -> list[uuid.UUID]:
    ids: list[uuid.UUID] = []
    for s in range(0, n, chunk):
        batch = [NewJob("noop", {"i": i}) for i in range(s, min(n, s + chunk))]
        ids += await queue.enqueue_many(batch)
    return ids


async def drain_once(dsn: str, n: int, procs: int, concurrency: int) -> dict[str, Any]:
    """Workers start after the jobs are queued; rate from first claim to last completion."""
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        queue = Queue(pool)
        ids = await enqueue_noops(queue, n)
        await store.analyze(pool)
        t_spawn = time.monotonic()
        workers = [start_worker(dsn, concurrency) for _ in range(procs)]
        try:
            # Claims go in creation order: until the last jobs queued have ended, the rest is
            # not worth probing.
            last = ids[-100:]

            async def done() -> bool:
                if await store.unfinished_count(pool, last):
                    return False
                return await store.unfinished_count(pool, ids) == 0

            # The rate comes from the rows' own start and finish times, not from this poll;
            # polled every 10 ms, 20,000 id probes took most of a core beside the drain, more
            # so the larger the tables (~40-150 ms per poll with 10M history).
            finished = await wait_until(done, timeout=600, interval=0.2)
            wall = time.monotonic() - t_spawn
        finally:
            stop_workers(workers)
        row = await store.drain_outcome(pool, ids)
        await store.forget_succeeded(pool, "noop")
    finally:
        await pool.close()
    span = row["span"]
    ok = finished and row["once"] == n and row["other"] == 0
    return {
        "n": n,
        "procs": procs,
        "concurrency": concurrency,
        "seconds": r(span, 3),
        "jobs_per_s": r(n / span) if span else None,
        "wall_seconds_incl_startup": r(wall, 3),
        "succeeded_exactly_once": row["once"],
        "ok": ok,
    }


async def bench_drain(admin: str, a: argparse.Namespace) -> None:
    for procs in a.procs:
        for _ in range(a.rounds):
            async with fresh_db(admin, "drain") as dsn:
                rec = await drain_once(dsn, a.n, procs, a.concurrency)
            emit({"bench": "drain", **rec})


# -- enqueue ----------------------------------------------------------------------------------


async def bench_enqueue(admin: str, a: argparse.Namespace) -> None:
    async with fresh_db(admin, "enqueue") as dsn:
        pool = await db.create_pool(dsn, min_size=50, max_size=50)
        queue = Queue(pool)
        try:
            # Sequential single inserts.
            n = a.enqueue_n
            lat: list[float] = []
            t0 = time.monotonic()
            for i in range(n):
                t = time.monotonic()
                await queue.enqueue(NewJob("noop", {"i": i}))
                lat.append(time.monotonic() - t)
            dt = time.monotonic() - t0
            emit(_enq("sequential", n, dt, lat, tasks=1))

            # 50 concurrent tasks, one insert per call.
            lat = []
            per = n * 2 // 50
            payload = {"i": 0}

            async def one_task() -> None:
                for _ in range(per):
                    t = time.monotonic()
                    await queue.enqueue(NewJob("noop", payload))
                    lat.append(time.monotonic() - t)

            t0 = time.monotonic()
            await asyncio.gather(*(one_task() for _ in range(50)))
            dt = time.monotonic() - t0
            emit(_enq("concurrent", per * 50, dt, lat, tasks=50))

            # Bulk: enqueue_many, one statement per chunk.
            for chunk, keyed in ((5000, False), (1000, False), (5000, True)):
                total = a.bulk_n
                lat = []
                tag = uuid.uuid4().hex[:8]
                batches = [
                    [
                        NewJob(
                            "noop",
                            {"i": i},
                            idempotency_key=f"{tag}-{i}" if keyed else None,
                        )
                        for i in range(s, min(total, s + chunk))
                    ]
                    for s in range(0, total, chunk)
                ]
                t0 = time.monotonic()
                for batch in batches:
                    t = time.monotonic()
                    await queue.enqueue_many(batch)
                    lat.append(time.monotonic() - t)
                dt = time.monotonic() - t0
                emit(
                    {
                        **_enq("bulk", total, dt, lat, tasks=1),
                        "chunk": chunk,
                        "idempotency_keys": keyed,
                    }
                )
        finally:
            await pool.close()
        await bench_http(dsn, a)


def _enq(mode: str, n: int, dt: float, lat: list[float], *, tasks: int) -> dict[str, Any]:
    return {
        "bench": "enqueue",
        "mode": mode,
        "tasks": tasks,
        "n": n,
        "seconds": r(dt, 3),
        "jobs_per_s": r(n / dt),
        "p50_ms": r(pct(lat, 50) * 1000, 3),
        "p99_ms": r(pct(lat, 99) * 1000, 3),
        "ok": True,
    }


async def bench_http(dsn: str, a: argparse.Namespace) -> None:
    """POST /jobs from a separate load-generator process: 64 keep-alive connections."""
    port = 18731
    async with api_process(dsn, port):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.loadgen",
                "--port",
                str(port),
                "--connections",
                str(a.http_connections),
                "--seconds",
                str(a.http_seconds),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        rec = json.loads(out.stdout.strip().splitlines()[-1])
    conn = await asyncpg.connect(dsn)
    try:
        stored = await store.stored_of_kind(conn, "http")
    finally:
        await conn.close()
    rec["stored"] = stored
    rec["ok"] = rec["ok"] and stored == rec["n"]
    emit({"bench": "enqueue", "mode": "http", **rec})


# -- latency ----------------------------------------------------------------------------------


async def bench_latency(admin: str, a: argparse.Namespace) -> None:
    for rate in a.rates:
        async with fresh_db(admin, "latency") as dsn:
            worker = start_worker(dsn, 10)
            pool = await db.create_pool(dsn, min_size=1, max_size=2)
            try:
                queue = Queue(pool)
                for i in range(20):  # warm-up: the worker is connected and listening
                    await queue.enqueue(NewJob("noop", {"i": i}))

                async def warm(pool: asyncpg.Pool = pool) -> bool:
                    return await store.succeeded_total(pool) >= 20

                await wait_until(warm, 60)
                await asyncio.sleep(0.5)
                n, period = a.latency_n, 1.0 / rate
                calls: list[float] = []
                start = time.monotonic() + 0.05
                for i in range(n):
                    delay = start + i * period - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    t0 = time.monotonic()
                    await queue.enqueue(NewJob("latency", {"t0": t0, "i": i}))
                    calls.append(time.monotonic() - t0)

                async def all_done(pool: asyncpg.Pool = pool, n: int = n) -> bool:
                    return await store.succeeded_of_kind(pool, "latency") >= n

                ok = await wait_until(all_done, 60)
                lat = await store.results_of_kind(pool, "latency", "lat_ms")
            finally:
                await pool.close()
                stop_workers([worker])
        emit(
            {
                "bench": "latency",
                "rate": rate,
                "n": n,
                "measured": len(lat),
                "p50_ms": r(pct(lat, 50), 2),
                "p95_ms": r(pct(lat, 95), 2),
                "p99_ms": r(pct(lat, 99), 2),
                "max_ms": r(max(lat), 2) if lat else None,
                "enqueue_call_p50_ms": r(pct(calls, 50) * 1000, 2),
                "enqueue_call_p99_ms": r(pct(calls, 99) * 1000, 2),
                "ok": ok and len(lat) == n,
            }
        )


# -- scale ------------------------------------------------------------------------------------

_FILL_FINISHED = """
INSERT INTO jobs (kind, payload, status, attempts, run_at, started_at, finished_at, result,
                  created_at, updated_at)
SELECT 'archived', jsonb_build_object('i', g), 'succeeded', 1,
       now() - interval '1 day', now() - interval '1 day', now() - interval '1 day', 'null',
       now() - interval '1 day', now() - interval '1 day'
FROM generate_series(1, $1) AS g
"""

_FILL_FUTURE = """
INSERT INTO jobs (kind, payload, run_at)
SELECT 'noop', jsonb_build_object('later', g), now() + interval '30 days'
FROM generate_series(1, $1) AS g
"""


async def claim_latency(dsn: str, samples: int) -> list[float]:
    """One job claimed and completed at a time, through the queue core."""
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        queue = Queue(pool)
        await enqueue_noops(queue, samples)
        await pool.execute("ANALYZE jobs")
        out: list[float] = []
        for _ in range(samples):
            t = time.monotonic()
            jobs = await queue.claim("bench", ["noop"], ["default"], 1, lease_seconds=30)
            out.append(time.monotonic() - t)
            await queue.complete(lease_of(jobs[0]))
        await pool.execute("DELETE FROM jobs WHERE kind = 'noop' AND status = 'succeeded'")
        await pool.execute("VACUUM ANALYZE jobs")
        return out
    finally:
        await pool.close()


async def bench_scale(admin: str, a: argparse.Namespace) -> None:
    procs = max(a.procs)
    async with fresh_db(admin, "scale") as dsn:
        results: dict[str, dict[str, Any]] = {}
        for label in ("empty", "large"):
            if label == "large":
                conn = await asyncpg.connect(dsn)
                try:
                    t = time.monotonic()
                    await conn.execute(_FILL_FINISHED, a.scale_finished)
                    await conn.execute(_FILL_FUTURE, a.scale_future)
                    await conn.execute("VACUUM ANALYZE jobs")
                    log(f"scale: filled in {time.monotonic() - t:.1f}s")
                finally:
                    await conn.close()
            claims = await claim_latency(dsn, 300)
            drains = [await drain_once(dsn, a.n, procs, a.concurrency) for _ in range(a.rounds)]
            rate = statistics.median(d["jobs_per_s"] or 0.0 for d in drains)
            rows = await _count_rows(dsn)
            rec = {
                "bench": "scale",
                "table": label,
                "rows": rows,
                "n": a.n,
                "procs": procs,
                "jobs_per_s": r(rate),
                "rounds": [d["jobs_per_s"] for d in drains],
                "claim_p50_ms": r(pct(claims, 50) * 1000, 3),
                "claim_p99_ms": r(pct(claims, 99) * 1000, 3),
                "ok": all(d["ok"] for d in drains),
            }
            results[label] = rec
            emit(rec)
        plan = await _explain_claim(dsn)
        ratio = results["large"]["jobs_per_s"] / results["empty"]["jobs_per_s"]
        emit(
            {
                "bench": "scale",
                "table": "ratio",
                "large_over_empty": r(ratio, 3),
                "uses_claim_index": "jobs_queue_claim_idx" in plan,
                "explain": plan,
                "ok": True,
            }
        )
        log("claim plan with the large table:\n" + plan)


async def _count_rows(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM jobs"))
    finally:
        await conn.close()


async def _explain_claim(dsn: str) -> str:
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        await enqueue_noops(Queue(pool), 1000)
        await pool.execute("ANALYZE jobs")
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + _CLAIM,
                "bench",
                ["noop"],
                ["default"],
                250,
                30.0,
                [],
                [],
                3,
            )
            plan = "\n".join(row[0] for row in rows)
            raise _Rollback
    except _Rollback:
        return plan
    finally:
        await pool.close()


class _Rollback(Exception):
    pass


# -- memory -----------------------------------------------------------------------------------


async def bench_memory(admin: str, a: argparse.Namespace) -> None:
    async with fresh_db(admin, "memory") as dsn:
        pool = await db.create_pool(dsn, min_size=1, max_size=2)
        queue = Queue(pool)
        try:
            for c in a.memory_concurrency:
                await pool.execute("TRUNCATE jobs")
                worker = start_worker(dsn, c, grace=0)
                try:
                    await asyncio.sleep(1.0)
                    idle = rss_mb(worker.pid)
                    await queue.enqueue_many([NewJob("sleep", {"seconds": 120}) for _ in range(c)])

                    async def running(c: int = c) -> bool:
                        n = await pool.fetchval("SELECT count(*) FROM jobs WHERE status='running'")
                        return bool(n >= c)

                    ok = await wait_until(running, 60)
                    await asyncio.sleep(2.0)  # a heartbeat or two
                    busy = rss_mb(worker.pid)
                finally:
                    stop_workers([worker])
                emit(
                    {
                        "bench": "memory",
                        "concurrency": c,
                        "idle_rss_mb": r(idle),
                        "rss_mb": r(busy),
                        "ok": ok,
                    }
                )
        finally:
            await pool.close()


# -- report -----------------------------------------------------------------------------------


def table() -> str:
    lines: list[str] = []

    def section(title: str, header: list[str], rows: list[list[Any]]) -> None:
        if not rows:
            return
        lines.append(f"\n{title}")
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        lines.append(fmt.format(*header))
        lines.extend(fmt.format(*[str(x) for x in row]) for row in rows)

    by = {k: [x for x in RECORDS if x.get("bench") == k] for k in ("drain", "enqueue")}
    section(
        "drain (no-op jobs, first claim to last completion)",
        ["procs", "concurrency", "n", "jobs/s", "ok"],
        [[x["procs"], x["concurrency"], x["n"], x["jobs_per_s"], x["ok"]] for x in by["drain"]],
    )
    section(
        "enqueue",
        ["mode", "tasks/conns", "n", "jobs/s", "p50 ms", "p99 ms", "ok"],
        [
            [
                x["mode"]
                + (f" chunk={x['chunk']}" if "chunk" in x else "")
                + (" keyed" if x.get("idempotency_keys") else ""),
                x.get("tasks", x.get("connections")),
                x["n"],
                x["jobs_per_s"],
                x["p50_ms"],
                x["p99_ms"],
                x["ok"],
            ]
            for x in by["enqueue"]
        ],
    )
    section(
        "latency (enqueue call start to handler start)",
        ["rate/s", "n", "p50 ms", "p95 ms", "p99 ms", "max ms", "enqueue p50 ms", "ok"],
        [
            [x["rate"], x["n"], x["p50_ms"], x["p95_ms"], x["p99_ms"], x["max_ms"],
             x["enqueue_call_p50_ms"], x["ok"]]
            for x in RECORDS if x.get("bench") == "latency"
        ],
    )  # fmt: skip
    section(
        "scale (drain and single-claim latency, empty vs large table)",
        ["table", "rows", "jobs/s", "claim p50 ms", "claim p99 ms", "ok"],
        [
            [x["table"], x["rows"], x["jobs_per_s"], x["claim_p50_ms"], x["claim_p99_ms"], x["ok"]]
            for x in RECORDS if x.get("bench") == "scale" and x["table"] != "ratio"
        ],
    )  # fmt: skip
    for x in RECORDS:
        if x.get("bench") == "scale" and x["table"] == "ratio":
            lines.append(
                f"large/empty drain ratio: {x['large_over_empty']}"
                f"  (claim on jobs_queue_claim_idx: {x['uses_claim_index']})"
            )
    section(
        "memory (worker RSS with sleeping jobs)",
        ["concurrency", "idle MB", "busy MB", "ok"],
        [
            [x["concurrency"], x["idle_rss_mb"], x["rss_mb"], x["ok"]]
            for x in RECORDS if x.get("bench") == "memory"
        ],
    )  # fmt: skip
    return "\n".join(lines)


BENCHES = {
    "drain": bench_drain,
    "enqueue": bench_enqueue,
    "latency": bench_latency,
    "scale": bench_scale,
    "memory": bench_memory,
}


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated benchmarks")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--n", type=int, default=20000, help="jobs per drain")
    p.add_argument("--procs", type=ints, default=[1, 2], help="worker processes, e.g. 1,2")
    p.add_argument("--concurrency", type=int, default=500, help="jobs in flight per worker")
    p.add_argument("--rounds", type=int, default=3, help="drain rounds (median reported)")
    p.add_argument("--enqueue-n", type=int, default=2000)
    p.add_argument("--bulk-n", type=int, default=100000)
    p.add_argument("--http-connections", type=int, default=64)
    p.add_argument("--http-seconds", type=float, default=5.0)
    p.add_argument("--rates", type=ints, default=[100, 200], help="latency: jobs/s")
    p.add_argument("--latency-n", type=int, default=1000)
    p.add_argument("--scale-finished", type=int, default=1_000_000)
    p.add_argument("--scale-future", type=int, default=100_000)
    p.add_argument("--memory-concurrency", type=ints, default=[1, 100, 1000])
    p.add_argument("--out", type=Path, default=RESULTS / "suite.jsonl")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.rounds, a.enqueue_n, a.bulk_n = 2000, 1, 200, 10000
        a.http_seconds, a.latency_n, a.rates = 1.0, 100, [100]
        a.scale_finished, a.scale_future = 20000, 2000
    return a


async def main(a: argparse.Namespace, admin: str) -> None:
    emit(await machine_info(admin))
    for raw in a.only.split(","):
        name = raw.strip()
        if name:
            log(f"== {name}")
            await BENCHES[name](admin, a)
    print(table(), flush=True)


def run(argv: list[str] | None = None) -> int:
    global OUT
    a = parse(argv)
    OUT = a.out
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("")
    with server() as admin:
        try:
            import uvloop

            uvloop.run(main(a, admin))
        except ImportError:  # pragma: no cover
            asyncio.run(main(a, admin))
    return 0 if all(x.get("ok", True) for x in RECORDS) else 1


if __name__ == "__main__":
    sys.exit(run())
