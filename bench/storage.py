"""Storage benchmarks: what a job costs the database over its life, what history costs the
hot path and the operator views, and whether the tables stop growing under retention.

    python -m bench.storage [--only wal,history,soak,layouts] [--quick] [options]

- wal: WAL bytes per job over its life, around a drain of --n jobs: enqueue (Queue.enqueue_many),
  drain (real `jobq worker` processes: claim + complete) and the VACUUM that reclaims the
  dead versions, from pg_current_wal_lsn(); records, full-page images and, where
  pg_walinspect can say, the bytes per relation (which index costs what).
- history: an empty database, then --finished finished jobs (seeded server-side, timed) and
  --future future-scheduled ones (Queue.enqueue_many): p50/p99 of GET /stats, GET /metrics and
  GET /jobs?status=succeeded&limit=50 against a real `jobq api` (warm, --requests each,
  sequential, keep-alive) and the drain of --n jobs, both states in one run; EXPLAIN (ANALYZE,
  BUFFERS) of the operator views' statements into bench/results/storage-explain-*.txt.
- soak (opt-in, long): a steady --rate jobs/s for --soak-seconds with JOBQ_RETENTION passed to the
  workers; every --sample-seconds the total relation size (tables + indexes + TOAST over jobq's
  schema) and the claim p99 (single-job claims of a probe queue through Queue.claim while the
  workers run); JSONL + a size-over-time plot in bench/results/.
- layouts: candidate storage layouts prototyped in scratch schemas with plain SQL (see
  bench/storage_layouts.py): WAL bytes per job and SQL-only drain rate of each, same run.

The default is `--only wal,history`. Runs against DATABASE_URL when set, otherwise a fresh
embedded PostgreSQL (the suite's durable settings, but jit and parallel query at PostgreSQL's
defaults: the operator views must be robust to the planner a user actually runs).
Each measurement is one JSON line on stdout and in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bench import store, suite
from bench.recording import Recording
from bench.suite import (
    BENCH_PG_SETTINGS,
    RECORDS,
    RESULTS,
    api_process,
    drain_once,
    emit,
    enqueue_noops,
    fresh_db,
    log,
    machine_info,
    pct,
    r,
    server,
    start_worker,
    stop_workers,
    wait_until,
    with_database,
)
from jobq import NewJob, Queue, db, schema
from jobq import queue as queue_core

# PostgreSQL's own defaults for what the suite turns off: jit, parallel workers.
STORAGE_PG_SETTINGS = {
    k: v
    for k, v in BENCH_PG_SETTINGS.items()
    if k not in {"jit", "max_parallel_workers_per_gather"}
}
API_PORT = 18741


# -- helpers ----------------------------------------------------------------------------------


async def wal_position(conn: asyncpg.Connection) -> dict[str, Any]:
    row = await conn.fetchrow(
        "SELECT pg_current_wal_lsn() AS lsn, wal_records, wal_fpi, wal_bytes FROM pg_stat_wal"
    )
    assert row is not None
    return dict(row)


async def wal_between(conn: asyncpg.Connection, a: dict[str, Any], b: dict[str, Any]) -> dict:
    """WAL bytes between two positions; records and full-page images from pg_walinspect where
    it is available (pg_stat_wal lags: other backends flush their counters later)."""
    nbytes = await conn.fetchval(
        "SELECT pg_wal_lsn_diff($1::pg_lsn, $2::pg_lsn)", b["lsn"], a["lsn"]
    )
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        row = await conn.fetchrow(
            "SELECT coalesce(sum(count), 0)::bigint AS records,"
            " coalesce(sum(fpi_count), 0)::bigint AS fpi"
            " FROM pg_get_wal_stats($1::pg_lsn, $2::pg_lsn, false)",
            a["lsn"],
            b["lsn"],
        )
        assert row is not None
        records, fpi = int(row["records"]), int(row["fpi"])
    except asyncpg.PostgresError:
        records = int(b["wal_records"] - a["wal_records"])
        fpi = int(b["wal_fpi"] - a["wal_fpi"])
    return {"bytes": int(nbytes), "records": records, "fpi": fpi}


async def wal_by_relation(conn: asyncpg.Connection, start: str, end: str) -> dict[str, int] | None:
    """Block data + full-page-image bytes per relation between two LSNs (pg_walinspect,
    PostgreSQL 16+), or None where it is not available."""
    if start == end:
        return {}
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        rows = await conn.fetch(
            """
            SELECT coalesce(c.relname, 'other:' || b.relfilenode::text) AS rel,
                   sum(b.block_data_length + b.block_fpi_length)::bigint AS bytes
            FROM pg_get_wal_block_info($1::pg_lsn, $2::pg_lsn) AS b
            LEFT JOIN pg_class AS c ON c.relfilenode = b.relfilenode AND b.reldatabase =
                 (SELECT oid FROM pg_database WHERE datname = current_database())
            GROUP BY 1 ORDER BY 2 DESC
            """,
            start,
            end,
        )
    except asyncpg.PostgresError as exc:
        log(f"wal: no per-relation breakdown ({exc.__class__.__name__}: {exc})")
        return None
    return {row["rel"]: int(row["bytes"]) for row in rows}


async def wal_by_record_type(
    conn: asyncpg.Connection, start: str, end: str
) -> dict[str, int] | None:
    """Bytes (headers included) per WAL record type between two LSNs (pg_walinspect)."""
    if start == end:
        return {}
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        rows = await conn.fetch(
            'SELECT "resource_manager/record_type" AS kind, combined_size::bigint AS bytes'
            " FROM pg_get_wal_stats($1::pg_lsn, $2::pg_lsn, true)"
            " WHERE count > 0 ORDER BY combined_size DESC",
            start,
            end,
        )
    except asyncpg.PostgresError as exc:
        log(f"wal: no per-record breakdown ({exc.__class__.__name__}: {exc})")
        return None
    return {row["kind"]: int(row["bytes"]) for row in rows}


async def http_get_timings(port: int, path: str, n: int, warm: int) -> dict[str, Any]:
    """`n` sequential GETs on one keep-alive connection after `warm` unmeasured ones."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lat: list[float] = []
    statuses: set[int] = set()
    size = 0
    try:
        for i in range(warm + n):
            t = time.monotonic()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            status = int((await reader.readline()).split()[1])
            length = None
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"transfer-encoding":
                    raise RuntimeError(f"{path}: chunked responses are not supported here")
            if length is None:
                raise RuntimeError(f"{path}: no content-length")
            body = await reader.readexactly(length)
            if i >= warm:
                lat.append(time.monotonic() - t)
                statuses.add(status)
                size = len(body)
    finally:
        writer.close()
    return {
        "path": path,
        "requests": n,
        "p50_ms": r(pct(lat, 50) * 1000, 2),
        "p99_ms": r(pct(lat, 99) * 1000, 2),
        "max_ms": r(max(lat) * 1000, 2),
        "statuses": sorted(statuses),
        "body_bytes": size,
        "ok": statuses == {200},
    }


# What GET /stats (jobq.stats), GET /metrics (counts) and GET /jobs?status=succeeded&limit=50
# (the list endpoint reads summaries) ask of the queue core, one call each.
OPERATOR_CALLS: list[tuple[str, Callable[[Queue], Awaitable[Any]]]] = [
    ("counts (GET /stats, GET /metrics, jobq status)", lambda q: q.counts()),
    ("oldest due (GET /stats)", lambda q: q.oldest_due()),
    ("finished per minute (GET /stats)", lambda q: q.finished_per_minute(15)),
    ("failing kinds (GET /stats)", lambda q: q.failing_kinds(15, 5)),
    ("unhandled (GET /stats)", lambda q: q.unhandled()),
    (
        "GET /jobs?status=succeeded&limit=50",
        lambda q: q.list_summaries(status="succeeded", limit=50),
    ),
]
CLAIM_BATCH = 250  # what a worker at concurrency >= 250 asks for at once; drain_loop's figure


def _plan(rows: list[asyncpg.Record]) -> str:
    return "\n".join(row[0] for row in rows)


async def explain_operator_views(dsn: str) -> dict[str, str]:
    """EXPLAIN (ANALYZE, BUFFERS) of every statement each operator view runs, warm, and of a
    worker's claim and completion of CLAIM_BATCH due jobs (in a transaction rolled back, so
    the database is left as it was)."""
    plans: dict[str, str] = {}
    conn = await asyncpg.connect(dsn)
    rec = Recording(conn)
    as_pool: Any = rec  # quacks like the pool and the connection the queue core takes
    queue = Queue(as_pool)
    try:
        for name, call in OPERATOR_CALLS:
            try:
                await call(queue)  # warm: the figures are for a warm cache
                rec.take()
                await call(queue)
            except Exception as exc:  # a view the queue core no longer has: say so, go on
                plans[name] = f"(not measured: {exc.__class__.__name__}: {exc})"
                rec.take()
                continue
            parts = []
            for i, (sql, args) in enumerate(rec.take(), start=1):
                rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
                parts.append((f"-- statement {i}\n" if i > 1 else "") + _plan(rows))
            plans[name] = "\n".join(parts) or "(no statement: answered without the database)"
        plans.update(await explain_claim_and_complete(conn, queue, rec))
    finally:
        await conn.close()
    return plans


async def explain_claim_and_complete(
    conn: asyncpg.Connection, queue: Queue, rec: Recording
) -> dict[str, str]:
    as_pool: Any = rec
    plans: dict[str, str] = {}
    tr = conn.transaction()
    await tr.start()
    try:
        await queue.enqueue_many(
            [NewJob("noop", {"explain": i}) for i in range(CLAIM_BATCH * 2)], connection=conn
        )
        await conn.execute("SAVEPOINT before_claim")
        jobs = await queue.claim(
            "explain",
            ["noop"],
            ["default"],
            CLAIM_BATCH,
            lease_seconds=30,
            conn=as_pool,
        )
        claim = rec.take()
        await conn.execute("SAVEPOINT before_complete")
        await queue.complete_many(
            [(queue_core.lease_of(j), "null") for j in jobs],
            conn=as_pool,
        )
        complete = rec.take()
        await conn.execute("ROLLBACK TO SAVEPOINT before_complete")
        # The rows are running under the same leases again: the completion runs as it did.
        plans[f"complete {len(jobs)} (worker)"] = "\n".join(
            [_plan(await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + q, *a)) for q, a in complete]
        )
        await conn.execute("ROLLBACK TO SAVEPOINT before_claim")
        plans[f"claim {CLAIM_BATCH} of {CLAIM_BATCH * 2} due (worker)"] = "\n".join(
            [_plan(await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + q, *a)) for q, a in claim]
        )
    finally:
        await tr.rollback()
    return plans


# -- wal --------------------------------------------------------------------------------------


async def bench_wal(admin: str, a: argparse.Namespace) -> None:
    for round_no in range(a.rounds):
        async with fresh_db(admin, "wal") as dsn:
            emit({"bench": "storage_wal", "round": round_no + 1, **await wal_once(dsn, a)})


async def wal_once(dsn: str, a: argparse.Namespace) -> dict[str, Any]:
    n = a.n
    conn = await asyncpg.connect(dsn)
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        await conn.execute("CHECKPOINT")  # every phase starts with the same full-page-image state
        p0 = await wal_position(conn)
        ids = await enqueue_noops(Queue(pool), n)
        p1 = await wal_position(conn)
        await store.analyze(conn)
        p1b = await wal_position(conn)
        workers = [start_worker(dsn, a.concurrency) for _ in range(a.procs)]
        try:

            async def done() -> bool:
                return await store.succeeded_count(pool, ids) >= n

            finished = await wait_until(done, timeout=600, interval=0.05)
        finally:
            stop_workers(workers)
        p2 = await wal_position(conn)
        outcome = await store.drain_outcome(conn, ids)
        await store.vacuum(conn)
        p3 = await wal_position(conn)
        by_type = {
            "enqueue": await wal_by_record_type(conn, p0["lsn"], p1["lsn"]),
            "drain": await wal_by_record_type(conn, p1b["lsn"], p2["lsn"]),
        }
        by_rel = {
            "enqueue": await wal_by_relation(conn, p0["lsn"], p1["lsn"]),
            "drain": await wal_by_relation(conn, p1b["lsn"], p2["lsn"]),
            "vacuum": await wal_by_relation(conn, p2["lsn"], p3["lsn"]),
        }
        phases = {
            "enqueue": await wal_between(conn, p0, p1),
            "drain": await wal_between(conn, p1b, p2),
            "vacuum": await wal_between(conn, p2, p3),
        }
    finally:
        await pool.close()
        await conn.close()
    life = phases["enqueue"]["bytes"] + phases["drain"]["bytes"]
    rec: dict[str, Any] = {
        "n": n,
        "procs": a.procs,
        "concurrency": a.concurrency,
        # The target's figure: enqueue -> claim -> complete.
        "bytes_per_job": r(life / n),
        "bytes_per_job_with_vacuum": r((life + phases["vacuum"]["bytes"]) / n),
    }
    for phase, w in phases.items():
        rec[f"{phase}_bytes_per_job"] = r(w["bytes"] / n)
        rec[f"{phase}_records_per_job"] = r(w["records"] / n, 2)
        rec[f"{phase}_fpi_per_job"] = r(w["fpi"] / n, 3)
    rec["by_relation_bytes_per_job"] = {
        phase: {k: r(v / n) for k, v in rels.items() if v / n >= 1.0} if rels else None
        for phase, rels in by_rel.items()
    }
    rec["by_record_type_bytes_per_job"] = {
        phase: {k: r(v / n) for k, v in types.items() if v / n >= 1.0} if types else None
        for phase, types in by_type.items()
    }
    rec["succeeded_exactly_once"] = outcome["once"]
    rec["ok"] = finished and outcome["once"] == n and outcome["other"] == 0
    return rec


# -- history ----------------------------------------------------------------------------------

HISTORY_PATHS = ("/stats", "/metrics", "/jobs?status=succeeded&limit=50")


async def bench_history(admin: str, a: argparse.Namespace) -> None:
    results: dict[str, dict[str, Any]] = {}
    async with fresh_db(admin, "history") as dsn:
        results["empty"] = await history_state(dsn, "empty", a)
        if a.history_db:
            async with kept_db(admin, a.history_db) as large_dsn:
                await seed(large_dsn, a)
                results["large"] = await history_state(large_dsn, "large", a)
                interleaved = await interleaved_drains(admin, large_dsn, a) if a.interleave else {}
        else:
            await seed(dsn, a)
            results["large"] = await history_state(dsn, "large", a)
            interleaved = await interleaved_drains(admin, dsn, a) if a.interleave else {}
    empty, large = results["empty"], results["large"]
    ratio = large["drain_jobs_per_s"] / empty["drain_jobs_per_s"]
    emit(
        {
            "bench": "storage_history",
            "state": "ratio",
            "drain_large_over_empty": r(ratio, 3),
            **interleaved,
            "p99_ms_large": {p: large["http"][p]["p99_ms"] for p in HISTORY_PATHS},
            "ok": True,
        }
    )


async def history_state(dsn: str, label: str, a: argparse.Namespace) -> dict[str, Any]:
    """The routes' timings through a real `jobq api`, the drains, the sizes and the EXPLAINs
    of one database in one state."""
    async with api_process(dsn, API_PORT):
        http = {p: await http_get_timings(API_PORT, p, a.requests, a.warm) for p in HISTORY_PATHS}
    drains = [await drain_once(dsn, a.n, a.procs, a.concurrency) for _ in range(a.rounds)]
    sizes = await _sizes(dsn)
    rate = statistics.median(d["jobs_per_s"] or 0.0 for d in drains)
    rec = {
        "bench": "storage_history",
        "state": label,
        "finished": a.finished if label == "large" else 0,
        "future": a.future if label == "large" else 0,
        "http": http,
        "drain_jobs_per_s": r(rate),
        "drain_rounds": [d["jobs_per_s"] for d in drains],
        "total_relation_mb": r(sum(sizes.values()) / 2**20),
        "ok": all(d["ok"] for d in drains) and all(h["ok"] for h in http.values()),
    }
    emit(rec)
    plans = await explain_operator_views(dsn)
    path = RESULTS / f"storage-explain-{label}.txt"
    path.write_text(
        "".join(f"-- {name}\n{plan}\n\n" for name, plan in plans.items()), encoding="utf-8"
    )
    log(f"history: EXPLAINs with the {label} database -> {path}")
    return rec


async def bench_seed(admin: str, a: argparse.Namespace) -> None:
    """Only seed --history-db (for a later `--only history --history-db` run)."""
    if not a.history_db:
        raise SystemExit("--only seed needs --history-db NAME")
    async with kept_db(admin, a.history_db) as dsn:
        await seed(dsn, a)


@contextlib.asynccontextmanager
async def kept_db(admin: str, name: str) -> AsyncIterator[str]:
    """A database of this name, created and migrated if need be, kept afterwards: seeding
    10M jobs takes long, so a later run (of later code) can measure the same history."""
    conn = await asyncpg.connect(admin)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = with_database(admin, name)
    c = await db.connect(dsn)
    try:
        await schema.migrate(c)
    finally:
        await c.close()
    yield dsn


async def interleaved_drains(admin: str, large_dsn: str, a: argparse.Namespace) -> dict[str, Any]:
    """Drains of the large database and of a fresh empty one on the same server, alternating
    (large first in odd rounds): the "empty" and "large" states above are minutes apart, and
    on a shared machine the load changes in between; alternating rounds share it."""
    async with fresh_db(admin, "history_empty") as empty_dsn:
        rates: dict[str, list[float]] = {"large": [], "empty": []}
        for i in range(a.rounds):
            order = ("large", "empty") if i % 2 == 0 else ("empty", "large")
            for label in order:
                d = await drain_once(
                    large_dsn if label == "large" else empty_dsn, a.n, a.procs, a.concurrency
                )
                if not d["ok"]:
                    raise RuntimeError(f"interleaved drain of the {label} database: {d}")
                rates[label].append(d["jobs_per_s"] or 0.0)
    med_large, med_empty = statistics.median(rates["large"]), statistics.median(rates["empty"])
    return {
        "interleaved_drain_rounds": rates,
        "interleaved_drain_large_over_empty": r(med_large / med_empty, 3),
    }


async def seed(dsn: str, a: argparse.Namespace) -> None:
    conn = await asyncpg.connect(dsn)
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        finished, future = await store.seeded(conn)
        if (finished, future) == (a.finished, a.future):
            log(f"history: {finished:,} finished and {future:,} future jobs already there")
            await conn.execute("VACUUM ANALYZE")
            return
        if finished or future:
            raise RuntimeError(f"{dsn} holds {finished} seeded and {future} future jobs")
        t0 = time.monotonic()

        def progress(done: int) -> None:
            el = time.monotonic() - t0
            log(f"history: {done:,} finished jobs seeded in {el:.0f}s ({done / el:,.0f}/s)")

        await store.seed_history(conn, a.finished, days=a.history_days, progress=progress)
        t1 = time.monotonic()
        queue = Queue(pool)
        at = datetime.now(UTC) + timedelta(days=30)
        for s in range(0, a.future, 5000):
            k = min(5000, a.future - s)
            await queue.enqueue_many(
                [NewJob("noop", {"later": s + i}, run_at=at) for i in range(k)]
            )
        t2 = time.monotonic()
        await conn.execute("VACUUM ANALYZE")
        t3 = time.monotonic()
        sizes = await _sizes(dsn)
    finally:
        await pool.close()
        await conn.close()
    emit(
        {
            "bench": "storage_seed",
            "finished": a.finished,
            "future": a.future,
            "history_days": a.history_days,
            "finished_seconds": r(t1 - t0),
            "finished_rows_per_s": r(a.finished / (t1 - t0)) if a.finished else None,
            "future_seconds": r(t2 - t1),
            "future_rows_per_s": r(a.future / (t2 - t1)) if a.future else None,
            "vacuum_analyze_seconds": r(t3 - t2),
            "total_relation_mb": r(sum(sizes.values()) / 2**20),
            "ok": True,
        }
    )


async def _sizes(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return await store.relation_sizes(conn)
    finally:
        await conn.close()


# -- soak -------------------------------------------------------------------------------------


def retention_supported() -> bool:
    """Whether this checkout's settings read JOBQ_RETENTION (the soak passes it either way)."""
    import inspect

    from jobq import settings

    return "JOBQ_RETENTION" in inspect.getsource(settings)


async def bench_soak(admin: str, a: argparse.Namespace) -> None:
    out = a.soak_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    env = (
        {"JOBQ_RETENTION": a.retention, "JOBQ_RETENTION_FAILED": a.retention} if a.retention else {}
    )
    async with fresh_db(admin, "soak") as dsn:
        pool = await db.create_pool(dsn, min_size=2, max_size=4)
        conn = await asyncpg.connect(dsn)
        queue = Queue(pool)
        workers = [start_worker(dsn, a.soak_concurrency, env=env) for _ in range(a.procs)]
        stop = asyncio.Event()
        produced = 0
        claims: list[float] = []

        async def produce() -> None:
            nonlocal produced
            tick = 0.1
            start = time.monotonic()
            while not stop.is_set():
                due = int((time.monotonic() - start) * a.rate)  # steady on average
                if due > produced:
                    k = min(due - produced, 5000)
                    await queue.enqueue_many(
                        [NewJob("noop", {"i": produced + i}) for i in range(k)]
                    )
                    produced += k
                await asyncio.sleep(tick)

        async def probe() -> None:
            # A queue no worker serves: single-job claims through the queue core, timed.
            while not stop.is_set():
                await queue.enqueue_many([NewJob("noop", {"probe": True}, queue="probe")])
                t = time.monotonic()
                jobs = await queue.claim("probe", ["noop"], ["probe"], 1, lease_seconds=30)
                claims.append(time.monotonic() - t)
                if jobs:
                    await queue.complete(queue_core.lease_of(jobs[0]))
                await asyncio.sleep(0.1)

        async def prune_with_delete() -> int:
            return await store.prune_finished(conn, a.prune_older_than, 10_000)

        if a.retention and retention_supported():
            # The migration makes day-wide leaves; with a short retention the partitioner
            # replaces them while they are empty. Jobs finished before its first pass would
            # land in a day-wide leaf, kept for a day: measure the steady state, not that.
            width = duration(a.retention)
            ready = await wait_until(
                lambda: store.leaf_no_wider_than(conn, width), timeout=120, interval=0.5
            )
            log(f"soak: history leaves narrower than {a.retention}: {ready}")
        tasks = [asyncio.create_task(produce()), asyncio.create_task(probe())]
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < a.soak_seconds:
                await asyncio.sleep(a.sample_seconds - (time.monotonic() - t0) % a.sample_seconds)
                for t in tasks:
                    if t.done():
                        t.result()  # a failed producer ends the soak with its error
                window, claims[:] = list(claims), []
                pruned = await prune_with_delete() if a.prune_with_delete else None
                sizes = await store.relation_sizes(conn)
                lag = await queue.oldest_due()
                sample = {
                    "t": r(time.monotonic() - t0),
                    "produced": produced,
                    "total_bytes": sum(sizes.values()),
                    "relations": sizes,
                    **await store.tuple_counts(conn),
                    "claim_p50_ms": r(pct(window, 50) * 1000, 3),
                    "claim_p99_ms": r(pct(window, 99) * 1000, 3),
                    "claims": len(window),
                    "oldest_due_age_s": max((x.age_seconds for x in lag), default=0.0),
                    "pruned_by_delete": pruned,
                }
                samples.append(sample)
                with out.open("a") as f:
                    f.write(json.dumps(sample) + "\n")
                log(
                    f"soak t={sample['t']:.0f}s produced={produced} "
                    f"size={sample['total_bytes'] / 2**20:.1f}MB "
                    f"claim p99={sample['claim_p99_ms']}ms lag={sample['oldest_due_age_s']:.1f}s"
                )
        finally:
            stop.set()
            for t in tasks:
                with contextlib.suppress(Exception):
                    await t
            stop_workers(workers)
            await conn.close()
            await pool.close()
    emit(soak_summary(samples, a))
    plot_soak(out, a.soak_plot, a)


def soak_summary(samples: list[dict[str, Any]], a: argparse.Namespace) -> dict[str, Any]:
    # The plateau: the last half of the run (the last 10 minutes of the default 20).
    tail = [s for s in samples if s["t"] >= a.soak_seconds / 2] or samples
    sizes = [s["total_bytes"] for s in tail]
    mid = statistics.median(sizes) if sizes else 0
    band = (min(sizes) / mid - 1, max(sizes) / mid - 1) if mid else (0.0, 0.0)
    head = samples[: max(1, len(samples) // 2)]
    elapsed = samples[-1]["t"] if samples else 0.0
    return {
        "bench": "storage_soak",
        "rate": a.rate,
        "seconds": a.soak_seconds,
        "retention": a.retention,
        "retention_supported": retention_supported(),
        "prune_with_delete": a.prune_with_delete,
        "produced": samples[-1]["produced"] if samples else 0,
        "achieved_rate": r(samples[-1]["produced"] / elapsed) if elapsed else None,
        "size_mb_first": r(samples[0]["total_bytes"] / 2**20) if samples else None,
        "size_mb_last": r(samples[-1]["total_bytes"] / 2**20) if samples else None,
        "plateau_median_mb": r(mid / 2**20),
        "plateau_band_pct": [r(band[0] * 100), r(band[1] * 100)],
        "plateau_within_20pct": bool(mid) and band[0] >= -0.2 and band[1] <= 0.2,
        "claim_p99_ms_first_half": r(statistics.median(s["claim_p99_ms"] for s in head), 3),
        "claim_p99_ms_second_half": r(statistics.median(s["claim_p99_ms"] for s in tail), 3),
        "max_oldest_due_age_s": r(max((s["oldest_due_age_s"] for s in samples), default=0.0), 2),
        "jsonl": str(a.soak_out),
        "ok": bool(samples),
    }


def plot_soak(jsonl: Path, png: Path, a: argparse.Namespace | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("soak: matplotlib is not installed (the bench extra): no plot")
        return
    samples = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    if not samples:
        return
    t = [s["t"] / 60 for s in samples]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(t, [s["total_bytes"] / 2**20 for s in samples], color="tab:blue", label="total size")
    ax.set_xlabel("minutes")
    ax.set_ylabel("tables + indexes + TOAST, MB", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(t, [s["claim_p99_ms"] for s in samples], color="tab:red", alpha=0.7, label="claim p99")
    ax2.set_ylabel("single-job claim p99, ms", color="tab:red")
    ax2.set_ylim(bottom=0)
    title = "jobq soak"
    if a is not None:
        how = f"JOBQ_RETENTION={a.retention}" if a.retention else "no retention"
        if a.retention and not retention_supported():
            how = "no JOBQ_RETENTION in this revision"
        if a.prune_with_delete:
            how += f", runbook DELETE of jobs finished > {a.prune_older_than:.0f}s ago"
        title += f": {a.rate} jobs/s, {how}"
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    log(f"soak: plot -> {png}")


# -- layouts ----------------------------------------------------------------------------------


async def bench_layouts(admin: str, a: argparse.Namespace) -> None:
    from bench import storage_layouts

    await storage_layouts.run(admin, a)


# -- main -------------------------------------------------------------------------------------

BENCHES = {
    "wal": bench_wal,
    "history": bench_history,
    "seed": bench_seed,
    "soak": bench_soak,
    "layouts": bench_layouts,
}


def duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="wal,history", help="wal,history,soak,layouts,seed")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--n", type=int, default=20000, help="jobs per drain")
    p.add_argument("--procs", type=int, default=2, help="worker processes")
    p.add_argument("--concurrency", type=int, default=500, help="jobs in flight per worker")
    p.add_argument("--rounds", type=int, default=3, help="rounds per measurement (median)")
    p.add_argument("--finished", type=int, default=10_000_000, help="history: finished jobs")
    p.add_argument("--future", type=int, default=1_000_000, help="history: future-scheduled jobs")
    p.add_argument("--history-days", type=int, default=3, help="history: finish times span")
    p.add_argument("--requests", type=int, default=200, help="history: requests per route")
    p.add_argument(
        "--history-db",
        default="",
        help="history: seed this database (kept; a later run reuses what it holds)",
    )
    p.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="history: also alternate drains of the large and a fresh empty database",
    )
    p.add_argument("--warm", type=int, default=20, help="history: unmeasured requests first")
    p.add_argument("--rate", type=int, default=1000, help="soak: jobs/s")
    p.add_argument("--soak-seconds", type=duration, default=1200.0, help="soak: e.g. 20m")
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument("--soak-concurrency", type=int, default=100)
    p.add_argument(
        "--retention", default="2m", help="soak: JOBQ_RETENTION for the workers ('' = unset)"
    )
    p.add_argument(
        "--prune-with-delete",
        action="store_true",
        help="soak: also run the runbook's batched DELETE every sample (schemas without retention)",
    )
    p.add_argument("--prune-older-than", type=duration, default=120.0)
    p.add_argument("--layout-n", type=int, default=20000, help="layouts: jobs per layout")
    p.add_argument("--layouts", default="", help="layouts: comma-separated names (default all)")
    p.add_argument("--out", type=Path, default=RESULTS / "storage.jsonl")
    p.add_argument("--soak-out", type=Path, default=RESULTS / "soak.jsonl")
    p.add_argument("--soak-plot", type=Path, default=RESULTS / "soak.png")
    p.add_argument("--port", type=int, default=54331, help="embedded server's port")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.rounds, a.finished, a.future = 2000, 1, 20000, 2000
        a.requests, a.warm, a.soak_seconds, a.sample_seconds = 50, 5, 30.0, 5.0
        a.rate, a.layout_n = 200, 2000
    return a


async def main(a: argparse.Namespace, admin: str) -> None:
    emit({**await machine_info(admin), "argv": sys.argv[1:]})
    for raw in a.only.split(","):
        name = raw.strip()
        if name:
            log(f"== {name}")
            await BENCHES[name](admin, a)


def run(argv: list[str] | None = None) -> int:
    a = parse(argv)
    suite.OUT = a.out
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("")
    with server(STORAGE_PG_SETTINGS, a.port) as admin:
        try:
            import uvloop

            uvloop.run(main(a, admin))
        except ImportError:  # pragma: no cover
            asyncio.run(main(a, admin))
    return 0 if all(x.get("ok", True) for x in RECORDS) else 1


if __name__ == "__main__":
    sys.exit(run())
