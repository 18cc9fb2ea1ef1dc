"""Scale-out benchmarks: PgBouncer transaction pooling against direct, a fleet of workers
through a small PgBouncer pool, and throughput against added round-trip time.

    python -m bench.scaleout [--only pooler,fleet,rtt] [--quick]    (part of `make bench`)

Each runs against a PostgreSQL of its own that listens on 127.0.0.1 (durable settings, as
the rest of the suite), with Debian's PgBouncer (`make test` installs it) started by
`tests/realparts.py`, the same helper the tests use. Round-trip time is added by a userspace
TCP proxy on loopback (`DelayProxy`); netem is not available in every kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
from tests.realparts import pgbouncer, tcp_dsn, tcp_server

from bench import store, suite
from jobq import NewJob, Queue, db, schema

DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    """Environment for the worker processes (and this process's pools) of one measurement."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def _database(pg_port: int, label: str) -> str:
    name = f"jobq_bench_{label}_{os.urandom(3).hex()}"
    conn = await asyncpg.connect(tcp_dsn("127.0.0.1", pg_port))
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    c = await db.connect(tcp_dsn("127.0.0.1", pg_port, name), pooler="none")
    try:
        await schema.migrate(c)
    finally:
        await c.close()
    return name


async def _latency_once(dsn: str, n: int, rate: float) -> list[float]:
    """enqueue -> handler start, ms: one worker (concurrency 10), jobs at `rate` per second."""
    worker = suite.start_worker(dsn, 10)
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        queue = Queue(pool)
        for i in range(20):
            await queue.enqueue(NewJob("noop", {"i": i}))

        async def warm() -> bool:
            return await store.succeeded_total(pool) >= 20

        await suite.wait_until(warm, 60)
        await asyncio.sleep(0.5)  # the listener's self-check is done
        start, period = time.monotonic() + 0.05, 1.0 / rate
        for i in range(n):
            delay = start + i * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await queue.enqueue(NewJob("latency", {"t0": time.monotonic(), "i": i}))

        async def done() -> bool:
            return await store.succeeded_of_kind(pool, "latency") >= n

        await suite.wait_until(done, 60)
        latencies = await store.results_of_kind(pool, "latency", "lat_ms")
    finally:
        await pool.close()
        suite.stop_workers([worker])
    return latencies


async def bench_pooler(_admin: str, a: argparse.Namespace) -> None:
    """Direct vs PgBouncer (transaction pooling) with JOBQ_LISTEN_DATABASE_URL, interleaved."""
    with (
        tcp_server(settings=DURABLE | suite.BENCH_PG_SETTINGS) as (_pg, pg_port),
        pgbouncer(pg_port, pool_size=20) as bouncer,
    ):
        results: dict[str, dict[str, list[float]]] = {}
        for _round in range(a.rounds):
            for mode in ("direct", "pgbouncer"):
                name = await _database(pg_port, "pooler")
                direct = tcp_dsn("127.0.0.1", pg_port, name)
                pooled = tcp_dsn("127.0.0.1", bouncer.port, name)
                env = (
                    {"JOBQ_POOLER": "none", "JOBQ_LISTEN_DATABASE_URL": None}
                    if mode == "direct"
                    else {"JOBQ_POOLER": "transaction", "JOBQ_LISTEN_DATABASE_URL": direct}
                )
                dsn = direct if mode == "direct" else pooled
                with _env(**env):
                    lat = await _latency_once(dsn, a.latency_n, 100.0)
                    drain = await suite.drain_once(dsn, a.n, 1, a.concurrency)
                got = results.setdefault(mode, {"p50": [], "drain": []})
                got["p50"].append(suite.pct(lat, 50))
                got["drain"].append(float(drain["jobs_per_s"] or 0.0))
                suite.emit(
                    {
                        "bench": "pooler",
                        "mode": mode,
                        "round": _round,
                        "latency_p50_ms": suite.r(suite.pct(lat, 50), 2),
                        "latency_p95_ms": suite.r(suite.pct(lat, 95), 2),
                        "drain_jobs_per_s": drain["jobs_per_s"],
                        "concurrency": a.concurrency,
                        "n": a.n,
                        "ok": bool(drain["ok"]) and len(lat) == a.latency_n,
                    }
                )
        d, p = results["direct"], results["pgbouncer"]
        p50_d, p50_p = statistics.median(d["p50"]), statistics.median(p["p50"])
        drain_d, drain_p = statistics.median(d["drain"]), statistics.median(p["drain"])
        suite.emit(
            {
                "bench": "pooler_summary",
                "latency_p50_ms_direct": suite.r(p50_d, 2),
                "latency_p50_ms_pgbouncer": suite.r(p50_p, 2),
                "latency_p50_delta_ms": suite.r(p50_p - p50_d, 2),
                "drain_direct": suite.r(drain_d),
                "drain_pgbouncer": suite.r(drain_p),
                "drain_ratio": suite.r(drain_p / drain_d, 3) if drain_d else None,
                "target_met": (p50_p - p50_d) <= 1.0 and drain_p >= 0.8 * drain_d,
            }
        )


async def bench_fleet(_admin: str, a: argparse.Namespace) -> None:
    """8 workers x concurrency 100 through PgBouncer with 20 server connections."""
    with (
        tcp_server(settings=DURABLE | suite.BENCH_PG_SETTINGS) as (_pg, pg_port),
        pgbouncer(pg_port, pool_size=20) as bouncer,
    ):
        name = await _database(pg_port, "fleet")
        direct = tcp_dsn("127.0.0.1", pg_port, name)
        pooled = tcp_dsn("127.0.0.1", bouncer.port, name)
        with _env(JOBQ_POOLER="transaction", JOBQ_LISTEN_DATABASE_URL=direct):
            rec = await suite.drain_once(pooled, a.fleet_n, 8, 100)
        errors = [line for line in bouncer.log().splitlines() if " ERROR " in line]
        suite.emit(
            {
                "bench": "fleet",
                "procs": 8,
                "concurrency": 100,
                "pgbouncer_server_connections": 20,
                **{k: rec[k] for k in ("n", "seconds", "jobs_per_s", "succeeded_exactly_once")},
                "pooler_errors": len(errors),
                "pooler_error_sample": errors[:3],
                "ok": bool(rec["ok"]) and not errors,
            }
        )


class DelayProxy:
    """A TCP proxy on loopback that delays every byte by half the RTT in each direction."""

    def __init__(self, upstream_port: int, rtt_ms: float) -> None:
        self.upstream_port = upstream_port
        self.one_way = rtt_ms / 2000.0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> DelayProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(self._pump(cr, uw), self._pump(ur, cw), return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await chunks.get()
                if not data:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(65536):
                chunks.put_nowait((loop.time() + self.one_way, data))
        finally:
            chunks.put_nowait((0.0, b""))
            await asyncio.gather(sender, return_exceptions=True)


async def bench_rtt(_admin: str, a: argparse.Namespace) -> None:
    """One worker's drain of no-op jobs at 1, 5 and 10 ms added RTT, for concurrency 10, 100,
    500; next to the rule concurrency / (1.3 x RTT)."""
    with tcp_server(settings=DURABLE | suite.BENCH_PG_SETTINGS) as (_pg, pg_port):
        for rtt in a.rtts:
            async with DelayProxy(pg_port, rtt) as proxy:
                for conc in a.rtt_concurrency:
                    name = await _database(pg_port, "rtt")
                    via = tcp_dsn("127.0.0.1", proxy.port, name)
                    rule = conc / (1.3 * rtt / 1000.0)
                    n = int(min(rule, 6000.0) * a.rtt_seconds)
                    with _env(JOBQ_POOLER=None, JOBQ_LISTEN_DATABASE_URL=None):
                        rec = await suite.drain_once(via, max(n, 500), 1, conc)
                    suite.emit(
                        {
                            "bench": "rtt",
                            "rtt_ms": rtt,
                            "concurrency": conc,
                            **{k: rec[k] for k in ("n", "seconds", "jobs_per_s")},
                            "rule_jobs_per_s": suite.r(rule),
                            "ok": rec["ok"],
                        }
                    )


async def _statement_ms(conn: asyncpg.Connection, n: int) -> float:
    """Median time of one parameterised statement, the shape of every jobq statement."""
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        await conn.fetchval("SELECT $1::int", i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


async def bench_roundtrip(_admin: str, a: argparse.Namespace) -> None:
    """What one statement costs direct with asyncpg's statement cache (one round trip), direct
    without it and through PgBouncer transaction pooling without it (two round trips: parse
    and describe, then bind and execute; PgBouncer 1.18 keeps no prepared statement). Between
    enqueue and start two statements are on the path: the insert and the claim."""
    with (
        tcp_server(settings=DURABLE | suite.BENCH_PG_SETTINGS) as (_pg, pg_port),
        pgbouncer(pg_port, pool_size=20) as bouncer,
    ):
        paths = {
            "direct, statement cache on": (pg_port, {}),
            "direct, statement cache off": (pg_port, {"statement_cache_size": 0}),
            "pgbouncer transaction, cache off": (bouncer.port, {"statement_cache_size": 0}),
        }
        conns = {
            label: await asyncpg.connect(tcp_dsn("127.0.0.1", port), **opts)  # type: ignore[arg-type]
            for label, (port, opts) in paths.items()
        }
        try:
            samples: dict[str, list[float]] = {label: [] for label in paths}
            for _round in range(a.rounds):
                for label, conn in conns.items():
                    samples[label].append(await _statement_ms(conn, a.latency_n * 4))
        finally:
            for conn in conns.values():
                await conn.close()
        for label, ms in samples.items():
            suite.emit(
                {
                    "bench": "roundtrip",
                    "path": label,
                    "statement_p50_ms": suite.r(statistics.median(ms), 3),
                    "rounds_ms": [suite.r(x, 3) for x in ms],
                }
            )


BENCHES: dict[str, Any] = {
    "pooler": bench_pooler,
    "fleet": bench_fleet,
    "rtt": bench_rtt,
    "roundtrip": bench_roundtrip,
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated benchmarks")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--n", type=int, default=20000, help="pooler: jobs per drain")
    p.add_argument("--concurrency", type=int, default=100, help="pooler: drain concurrency")
    p.add_argument("--rounds", type=int, default=3, help="pooler: rounds (medians reported)")
    p.add_argument("--latency-n", type=int, default=500, help="pooler: latency samples")
    p.add_argument("--fleet-n", type=int, default=40000, help="fleet: jobs to drain")
    p.add_argument("--rtts", type=suite.ints, default=[1, 5, 10], help="rtt: added ms")
    p.add_argument("--rtt-concurrency", type=suite.ints, default=[10, 100, 500])
    p.add_argument("--rtt-seconds", type=float, default=3.0, help="rtt: target drain time")
    p.add_argument("--out", type=Path, default=suite.RESULTS / "scaleout.jsonl")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.rounds, a.latency_n, a.fleet_n, a.rtt_seconds = 2000, 1, 100, 4000, 0.5
    return a


def table() -> str:
    rows = [x for x in suite.RECORDS if x.get("bench") != "machine"]
    return "\n".join(str({k: v for k, v in x.items() if k != "pooler_error_sample"}) for x in rows)


async def main(a: argparse.Namespace) -> None:
    for raw in a.only.split(","):
        name = raw.strip()
        if name:
            suite.log(f"== {name}")
            await BENCHES[name]("", a)
    print(table(), flush=True)


def run(argv: list[str] | None = None) -> int:
    a = parse(argv)
    suite.OUT = a.out
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("")
    try:
        import uvloop

        uvloop.run(main(a))
    except ImportError:  # pragma: no cover
        asyncio.run(main(a))
    return 0 if all(x.get("ok", True) for x in suite.RECORDS) else 1


if __name__ == "__main__":
    sys.exit(run())
