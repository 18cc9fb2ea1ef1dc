"""Benchmarks of fitting jobq into an application (docs/integration.md):

- txn: statements the server sees per transaction that enqueues with jobq.txn, on each driver,
  against the same transaction without the enqueue (pg_stat_statements, utility statements
  counted: BEGIN, COMMIT, SAVEPOINT);
- batch: POST /jobs/batch of 1,000 jobs through one `jobq api` process, jobs/s;
- wait: 1,000 concurrent GET /jobs/{id}?wait= on one `jobq api` process: how long after its
  job's completion (finished_at) each answer arrives, and the database connections the API
  process holds meanwhile.

    python -m bench.integration [--only txn,batch,wait] [--quick] [--out FILE]

Runs its own embedded PostgreSQL (with pg_stat_statements preloaded; the other benchmarks also
run against DATABASE_URL when set, the statement count needs the extension loaded there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

import jobq
from bench.suite import BENCH_PG_SETTINGS, child_env, fresh_db, pct, r
from jobq import NewJob, Queue, db, txn
from jobq.embedded import EmbeddedPostgres
from jobq.queue import lease_of

ROOT = Path(__file__).resolve().parent.parent
OUT: Path | None = None


def emit(rec: dict[str, Any]) -> None:
    # The machine may be shared: the load when the figure was taken goes with it.
    rec = {**rec, "loadavg_1m": round(os.getloadavg()[0], 2)}
    line = json.dumps(rec, default=str)
    print(line, flush=True)
    if OUT is not None:
        with OUT.open("a") as f:
            f.write(line + "\n")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def server() -> Any:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    settings = {
        **BENCH_PG_SETTINGS,
        "shared_preload_libraries": "pg_stat_statements",
        # Top-level statements: what clients send. (Nested ones, e.g. the statements of the
        # count triggers on jobs, run inside the server and cost no round trip.)
        "pg_stat_statements.track": "top",
        "pg_stat_statements.track_utility": "on",
        "max_connections": "200",
    }
    with tempfile.TemporaryDirectory(prefix="jobq-bench-int-") as tmp:
        pg = EmbeddedPostgres(Path(tmp), settings=settings, port=54341)
        dsn = pg.start()
        try:
            yield dsn
        finally:
            pg.stop()


# -- txn: statements per transaction ------------------------------------------------------


class Driver:
    """Runs `n` transactions: BEGIN, the caller's INSERT, optionally a jobq enqueue, COMMIT."""

    name: str

    async def run(self, dsn: str, n: int, enqueue: bool, keyed: bool) -> None:
        raise NotImplementedError


def _job(i: int, keyed: bool) -> NewJob:
    # keyed: every transaction replays the key the warm-up stored (the replay path).
    if keyed:
        return NewJob("noop", {"order": -1}, idempotency_key="bench-replay")
    return NewJob("noop", {"order": i})


class Asyncpg(Driver):
    name = "asyncpg"

    async def run(self, dsn: str, n: int, enqueue: bool, keyed: bool) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for i in range(n):
                async with conn.transaction():
                    await conn.execute("INSERT INTO orders (id) VALUES ($1)", i)
                    if enqueue:
                        await txn.enqueue(conn, _job(i, keyed))
        finally:
            await conn.close()


class PsycopgSync(Driver):
    name = "psycopg"

    async def run(self, dsn: str, n: int, enqueue: bool, keyed: bool) -> None:
        import psycopg

        with psycopg.connect(dsn) as conn:
            for i in range(n):
                with conn.transaction():
                    conn.execute("INSERT INTO orders (id) VALUES (%s)", (i,))
                    if enqueue:
                        txn.enqueue_sync(conn, _job(i, keyed))


class PsycopgAsync(Driver):
    name = "psycopg-async"

    async def run(self, dsn: str, n: int, enqueue: bool, keyed: bool) -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            for i in range(n):
                async with conn.transaction():
                    await conn.execute("INSERT INTO orders (id) VALUES (%s)", (i,))
                    if enqueue:
                        await txn.enqueue(conn, _job(i, keyed))


class SqlAlchemySession(Driver):
    name = "sqlalchemy-session-psycopg"

    async def run(self, dsn: str, n: int, enqueue: bool, keyed: bool) -> None:
        import sqlalchemy as sa
        from sqlalchemy.orm import Session

        engine = sa.create_engine(dsn.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with Session(engine) as session:
                for i in range(n):
                    with session.begin():
                        session.execute(sa.text("INSERT INTO orders (id) VALUES (:i)"), {"i": i})
                        if enqueue:
                            txn.enqueue_sync(session, _job(i, keyed))
        finally:
            engine.dispose()


class SqlAlchemyAsyncSession(Driver):
    name = "sqlalchemy-asyncsession-asyncpg"

    async def run(self, dsn: str, n: int, enqueue: bool, keyed: bool) -> None:
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

        engine = create_async_engine(dsn.replace("postgresql://", "postgresql+asyncpg://", 1))
        try:
            async with AsyncSession(engine) as session:
                for i in range(n):
                    async with session.begin():
                        await session.execute(
                            sa.text("INSERT INTO orders (id) VALUES (:i)"), {"i": i}
                        )
                        if enqueue:
                            await txn.enqueue(session, _job(i, keyed))
        finally:
            await engine.dispose()


class Django(Driver):
    name = "django"

    async def run(self, dsn: str, n: int, enqueue: bool, keyed: bool) -> None:
        await asyncio.to_thread(self._run, dsn, n, enqueue, keyed)

    def _run(self, dsn: str, n: int, enqueue: bool, keyed: bool) -> None:
        from urllib.parse import parse_qs

        import django
        from django.conf import settings

        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        database = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parts.path.lstrip("/"),
            "USER": parts.username or "",
            "PASSWORD": parts.password or "",
            # The embedded server is reached on its socket directory (?host=...).
            "HOST": parts.hostname or query.get("host", [""])[0],
            "PORT": str(parts.port or query.get("port", ["5432"])[0]),
        }
        if not settings.configured:
            settings.configure(DATABASES={"default": database}, USE_TZ=True, INSTALLED_APPS=[])
            django.setup()
        from django.db import connection, connections, transaction

        connections["default"].settings_dict.update(database)
        connection.close()
        try:
            for i in range(n):
                with transaction.atomic():
                    with connection.cursor() as cur:
                        cur.execute("INSERT INTO orders (id) VALUES (%s)", [i])
                    if enqueue:
                        txn.enqueue_sync(connection, _job(i, keyed))
        finally:
            connection.close()


DRIVERS: list[type[Driver]] = [
    Asyncpg,
    PsycopgSync,
    PsycopgAsync,
    SqlAlchemySession,
    SqlAlchemyAsyncSession,
    Django,
]

_COUNT = """
SELECT coalesce(sum(s.calls), 0)::bigint AS statements,
       coalesce(sum(s.calls) FILTER (WHERE s.query ILIKE '%jobq_idempotency_keys%'
                                       OR s.query ILIKE '%INSERT INTO jobs %'
                                       OR s.query ILIKE '%INSERT INTO jobs(%'), 0)::bigint AS jobq
FROM pg_stat_statements AS s JOIN pg_database AS d ON d.oid = s.dbid
WHERE d.datname = $1
  AND s.query NOT ILIKE '%pg_stat_statements%'
"""


async def bench_txn(admin: str, a: argparse.Namespace) -> None:
    conn = await asyncpg.connect(admin)
    try:
        if not await conn.fetchval(
            "SELECT count(*) > 0 FROM pg_settings"
            " WHERE name = 'shared_preload_libraries' AND setting LIKE '%pg_stat_statements%'"
        ):
            log("txn: pg_stat_statements is not preloaded on this server; skipped")
            return
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        await conn.close()
    n = 50 if a.quick else 200
    async with fresh_db(admin, "txn") as dsn:
        name = urlsplit(dsn).path.lstrip("/")
        setup = await asyncpg.connect(dsn)
        try:
            await setup.execute("CREATE TABLE orders (id int)")
            await txn.enqueue(setup, NewJob("noop", {"order": -1}, idempotency_key="bench-replay"))
        finally:
            await setup.close()
        admin_conn = await asyncpg.connect(admin)
        try:
            for cls in DRIVERS:
                counts: dict[str, dict[str, int]] = {}
                for label, enqueue, keyed in (
                    ("without", False, False),
                    ("enqueue", True, False),
                    ("replay", True, True),
                ):
                    driver = cls()
                    await driver.run(dsn, 2, enqueue, keyed)  # connect, warm up caches
                    await admin_conn.execute("SELECT pg_stat_statements_reset()")
                    await driver.run(dsn, n, enqueue, keyed)
                    row = await admin_conn.fetchrow(_COUNT, name)
                    counts[label] = {"statements": row["statements"], "jobq": row["jobq"]}
                per = {k: v["statements"] / n for k, v in counts.items()}
                emit(
                    {
                        "bench": "txn_statements",
                        "driver": cls.name,
                        "transactions": n,
                        "per_tx_without_enqueue": r(per["without"], 2),
                        "per_tx_with_enqueue": r(per["enqueue"], 2),
                        "added_by_enqueue": r(per["enqueue"] - per["without"], 2),
                        "jobq_statements_per_enqueue": r(counts["enqueue"]["jobq"] / n, 2),
                        "added_by_replay": r(per["replay"] - per["without"], 2),
                        # Per transaction, to the hundredth: a driver's once-per-connection
                        # queries (type introspection) are not the enqueue's.
                        "ok": round(per["enqueue"] - per["without"], 2) <= 1.0,
                    }
                )
        finally:
            await admin_conn.close()


# -- the API process ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def api(dsn: str, port: int, env: dict[str, str]) -> AsyncIterator[subprocess.Popen[bytes]]:
    # The jobq this benchmark imported (bench/integration_ab.sh runs two revisions' jobq
    # with this checkout's benchmark).
    src = Path(jobq.__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobq", "api", "--port", str(port)],
        env=child_env(dsn, {"PYTHONPATH": f"{src}{os.pathsep}{ROOT}", **env}),
        cwd=ROOT,
    )
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"`jobq api` exited with {proc.returncode}")
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: b\r\n\r\n")
                line = await reader.readline()
                writer.close()
                if b" 200 " in line:
                    break
            await asyncio.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


# -- batch: POST /jobs/batch jobs/s -------------------------------------------------------


async def bench_batch(admin: str, a: argparse.Namespace) -> None:
    size = 1000
    seconds = 5.0 if a.quick else 20.0
    port = 18751
    async with fresh_db(admin, "batch") as dsn, api(dsn, port, {}) as proc:
        for connections in (1, 2, 4):
            # CPU per batch: the API process, the database backends serving it, this client.
            cpu0 = await _cpu(proc.pid, dsn)
            latencies: list[float] = []
            errors: list[str] = []
            done = [0]

            async def client(
                c: int, until: float, latencies: list[float], errors: list[str], done: list[int]
            ) -> None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                try:
                    i = 0
                    while time.monotonic() < until:
                        jobs = [{"kind": "noop", "payload": {"c": c, "i": i, "j": j}}
                                for j in range(size)]  # fmt: skip
                        i += 1
                        body = orjson.dumps({"jobs": jobs})
                        head = (
                            "POST /jobs/batch HTTP/1.1\r\nHost: b\r\n"
                            "Content-Type: application/json\r\n"
                            f"Content-Length: {len(body)}\r\n\r\n"
                        ).encode()
                        t = time.monotonic()
                        writer.write(head + body)
                        status, _ = await read_response(reader)
                        latencies.append(time.monotonic() - t)
                        if status != 201:
                            errors.append(str(status))
                        else:
                            done[0] += size
                finally:
                    writer.close()

            t0 = time.monotonic()
            deadline = t0 + seconds
            await asyncio.gather(
                *(client(c, deadline, latencies, errors, done) for c in range(connections))
            )
            dt = time.monotonic() - t0
            cpu1 = await _cpu(proc.pid, dsn)
            batches = max(1, done[0] // size)
            cpu_ms = {
                k: r((cpu1[k] - cpu0.get(k, 0.0)) * 1000 / batches, 1)
                for k in ("api", "database", "client")
            }
            conn = await asyncpg.connect(dsn)
            try:
                stored = await conn.fetchval("SELECT count(*) FROM jobs")
                await conn.execute("TRUNCATE jobs")
            finally:
                await conn.close()
            emit(
                {
                    "bench": "batch",
                    "batch": size,
                    "connections": connections,
                    "seconds": r(dt, 2),
                    "jobs": done[0],
                    "jobs_per_s": r(done[0] / dt),
                    "p50_ms": r(pct(latencies, 50) * 1000, 1),
                    "p99_ms": r(pct(latencies, 99) * 1000, 1),
                    "errors": len(errors),
                    "stored": stored,
                    # Less noisy than the rate on a shared machine; on 2 cores the rate cannot
                    # pass 1,000 x 2 / (their sum in s), nor 1,000 / the API's (one process).
                    "cpu_ms_per_batch": cpu_ms,
                    "ok": not errors and stored == done[0] and done[0] / dt >= 20_000,
                }
            )


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process of this machine (Linux /proc), 0 once gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _cpu(api_pid: int, dsn: str) -> dict[str, float]:
    """CPU seconds so far of the API process, of the database's backends for `dsn` (each
    one of the API's pool: a backend started since counts from 0), and of this process."""
    conn = await asyncpg.connect(dsn)
    try:
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return {
        "api": _cpu_seconds(api_pid),
        "database": sum(_cpu_seconds(row["pid"]) for row in pids),
        "client": time.process_time(),
    }


# -- wait: 1,000 concurrent waiters --------------------------------------------------------


async def bench_wait(admin: str, a: argparse.Namespace) -> None:
    n = 200 if a.quick else 1000
    port = 18752
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * n)), hard))
    async with fresh_db(admin, "wait") as dsn:
        app = "jobq_bench_api"
        api_dsn = f"{dsn}{'&' if '?' in dsn else '?'}application_name={app}"
        env = {"JOBQ_HTTP_MAX_CONNECTIONS": str(n + 100), "JOBQ_POOL_MAX_SIZE": "10"}
        async with api(api_dsn, port, env) as proc:
            pool = await db.create_pool(dsn, min_size=1, max_size=4)
            queue = Queue(pool)
            try:
                for mode in ("paced", "burst"):
                    await run_waiters(queue, port, app, n, mode, proc.pid)
                    await pool.execute("TRUNCATE jobs, jobs_history")
            finally:
                await pool.close()


async def run_waiters(queue: Queue, port: int, app: str, n: int, mode: str, api_pid: int) -> None:
    """The waiters are a process of their own (`--waiter-client`), so that taking their
    answers' arrival times does not compete with the completions sent from here."""
    ids = await queue.enqueue_many([NewJob("noop", {"i": i}) for i in range(n)])
    jobs = await queue.claim("bench", ["noop"], ["default"], n, lease_seconds=300)
    assert len(jobs) == n
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.integration", "--waiter-client", str(port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(b"\n".join(str(i).encode() for i in ids) + b"\n")
    client.stdin.close()
    waiting: set[int] = set()  # backends of the API process that served the waiting
    seen: set[int] = set()
    kinds: dict[int, str] = {}

    async def sample() -> None:
        rows = await queue.pool.fetch(
            "SELECT pid, query FROM pg_stat_activity WHERE application_name = $1", app
        )
        for row in rows:
            seen.add(row["pid"])
            q = row["query"] or ""
            if "LISTEN" in q or "watched" in q or "uuid[]" in q:
                waiting.add(row["pid"])
                kinds.setdefault(row["pid"], q.split()[0] if q else "")

    async def all_watched() -> bool:
        await sample()
        return bool(await queue.pool.fetchval("SELECT count(*) FROM jobs WHERE watched") == n)

    await until(all_watched, 120)
    by_id = {j.id: j for j in jobs}
    # When each job's completion statement returned: it committed before then. (finished_at
    # is the statement's start, now(): a statement ending 1,000 jobs takes a while itself.)
    returned: dict[uuid.UUID, float] = {}
    api_cpu = _cpu_seconds(api_pid)
    t0 = time.monotonic()
    if mode == "burst":  # every job ends in one statement
        await queue.complete_many([(lease_of(j), "1") for j in jobs])
        returned.update(dict.fromkeys(ids, time.time()))
    else:  # 1,000 jobs/s: 10 jobs every 10 ms, each batch one completion statement
        for s in range(0, n, 10):
            await queue.complete_many([(lease_of(by_id[i]), "1") for i in ids[s : s + 10]])
            returned.update(dict.fromkeys(ids[s : s + 10], time.time()))
            if s % 100 == 0:
                await sample()
            await asyncio.sleep(max(0.0, t0 + (s + 10) / 1000 - time.monotonic()))
    out, _ = await asyncio.wait_for(client.communicate(), 120)
    # Hearing the endings, reading the jobs, writing the answers: the API's CPU per answer.
    api_cpu = _cpu_seconds(api_pid) - api_cpu
    received: dict[uuid.UUID, float] = {}
    statuses: list[str] = []
    for line in out.decode().splitlines():
        rec = json.loads(line)
        received[uuid.UUID(rec["id"])] = rec["t"]
        statuses.append(rec["status"])
    await sample()
    finished = {
        r["id"]: r["finished_at"].timestamp()
        for r in await queue.pool.fetch(
            "SELECT id, finished_at FROM jobs_history WHERE id = ANY($1::uuid[])", ids
        )
    }
    lat = [(received[i] - finished[i]) * 1000 for i in ids if i in received]
    after_return = [(received[i] - returned[i]) * 1000 for i in ids if i in received]
    statement = [(returned[i] - finished[i]) * 1000 for i in ids]
    emit(
        {
            "bench": "wait",
            "mode": mode,
            "waiters": n,
            "answered": len(received),
            "succeeded": statuses.count("succeeded"),
            "after_completion_ms": {
                "p50": r(pct(lat, 50), 1),
                "p90": r(pct(lat, 90), 1),
                "p99": r(pct(lat, 99), 1),
                "max": r(max(lat), 1),
                "mean": r(statistics.fmean(lat), 1),
            },
            # From the completion statement's return (after its commit, so this is less than
            # the time from the commit), and how long the statement took (finished_at to its
            # return): the answer cannot come before the commit.
            "after_statement_returned_ms": {
                "p50": r(pct(after_return, 50), 1),
                "p99": r(pct(after_return, 99), 1),
                "max": r(max(after_return), 1),
            },
            "completion_statement_ms": {
                "p50": r(pct(statement, 50), 1),
                "max": r(max(statement), 1),
            },
            "api_cpu_ms_per_answer": r(api_cpu * 1000 / n, 3),
            # Connections of the API process seen running the waiters' statements (LISTEN,
            # the marks, the shared reads), and all it had (its pool also serves the rollup
            # compactor and /readyz).
            "api_connections_for_waiting": len(waiting),
            "api_connections_all": len(seen),
            "api_waiting_backends_first_statement": sorted(kinds.values()),
            "ok": statuses.count("succeeded") == n and max(lat) <= 20 and len(waiting) <= 2,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )


async def waiter_client(port: int) -> None:
    """Reads job ids on stdin, one GET ?wait=60 per id on a connection of its own, all at once;
    prints each answer's arrival time (time.time()) as a JSON line."""
    ids = sys.stdin.read().split()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * len(ids) + 100)), hard))
    lines: list[str] = []

    async def waiter(job_id: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET /jobs/{job_id}?wait=60 HTTP/1.1\r\nHost: b\r\n\r\n".encode())
            await writer.drain()
            status, body = await read_response(reader)
            t = time.time()
            state = orjson.loads(body)["status"] if status == 200 else str(status)
            lines.append(json.dumps({"id": job_id, "t": t, "status": state}))
        finally:
            writer.close()

    await asyncio.gather(*(waiter(i) for i in ids))
    sys.stdout.write("\n".join(lines) + "\n")


async def until(pred: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)


BENCHES = {"txn": bench_txn, "batch": bench_batch, "wait": bench_wait}


def main(argv: list[str] | None = None) -> int:
    global OUT
    p = argparse.ArgumentParser(prog="python -m bench.integration")
    p.add_argument("--only", default=",".join(BENCHES))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "integration.jsonl")
    p.add_argument("--waiter-client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.waiter_client:
        asyncio.run(waiter_client(a.waiter_client))
        return 0
    OUT = a.out
    with server() as admin:
        for name in a.only.split(","):
            log(f"== {name}")
            asyncio.run(BENCHES[name](admin, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
