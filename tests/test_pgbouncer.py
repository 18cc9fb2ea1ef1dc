"""Everything through PgBouncer in transaction pooling mode (Debian's 1.18): the API, workers,
the CLI and migrations, with `JOBQ_POOLER=transaction`."""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from jobq import db, schema
from jobq.queue import NewJob, Queue, lease_of
from tests.helpers import ALL_JOBS, ROOT, wait_for, worker_process
from tests.realparts import pgbouncer, require_pgbouncer, tcp_dsn, tcp_server
from tests.registries import EXECUTIONS_DDL
from tests.servers import start_api, stop, wait_ready

POOLED = {"JOBQ_POOLER": "transaction"}


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    """(PostgreSQL's port, PgBouncer's port), both on 127.0.0.1."""
    require_pgbouncer()
    with tcp_server() as (_server, pg_port), pgbouncer(pg_port, pool_size=10) as bouncer:
        yield pg_port, bouncer.port


async def _new_database(pg_port: int) -> str:
    name = f"jobq_pooled_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(tcp_dsn("127.0.0.1", pg_port))
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return name


@pytest.fixture(scope="module")
async def dbname(ports: tuple[int, int]) -> str:
    name = await _new_database(ports[0])
    conn = await db.connect(tcp_dsn("127.0.0.1", ports[0], name))
    try:
        await schema.migrate(conn)
        await conn.execute(EXECUTIONS_DDL)
    finally:
        await conn.close()
    return name


@pytest.fixture(scope="module")
def direct(ports: tuple[int, int], dbname: str) -> str:
    return tcp_dsn("127.0.0.1", ports[0], dbname)


@pytest.fixture(scope="module")
def pooled(ports: tuple[int, int], dbname: str) -> str:
    return tcp_dsn("127.0.0.1", ports[1], dbname)


@pytest.fixture(scope="module")
async def check(direct: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection for the test's own look at the database."""
    conn = await asyncpg.connect(direct)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def stack(pooled: str, direct: str) -> AsyncIterator[tuple[str, Path]]:
    """An API and a worker, both through PgBouncer; the worker listens on a direct session.
    Yields the API's base URL and the file collecting both processes' stderr."""
    log = Path(tempfile.mkstemp(prefix="jobq-pooled-", suffix=".log")[1])
    with log.open("wb") as err:
        api, base = start_api(pooled, env=POOLED, stderr=err)
        worker = worker_process(
            pooled,
            "tests.registries:recording",
            "--concurrency",
            "20",
            env={**POOLED, "JOBQ_LISTEN_DATABASE_URL": direct},
            stderr=err,
        )
        try:
            await wait_ready(base, api)
            yield base, log
        finally:
            stop(api)
            stop(worker)
            log.unlink(missing_ok=True)


async def test_api_worker_and_cli_run_jobs_through_transaction_pooling(
    stack: tuple[str, Path], pooled: str, check: asyncpg.Connection
) -> None:
    base, log = stack
    limit = asyncio.Semaphore(20)

    async def post(c: httpx.AsyncClient, i: int) -> int:
        async with limit:
            r = await c.post("/jobs", json={"kind": "record", "payload": {"i": i}})
            return r.status_code

    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        codes = await asyncio.gather(*(post(c, i) for i in range(300)))
        assert codes == [201] * 300
        cli = subprocess.run(
            [sys.executable, "-m", "jobq", "enqueue", "record"],
            env={**os.environ, **POOLED, "DATABASE_URL": pooled, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert cli.returncode == 0, cli.stderr.decode()

        async def all_done() -> bool:
            n = await check.fetchval(f"SELECT count(*) FROM {ALL_JOBS} WHERE status = 'succeeded'")
            return bool(n == 301)

        await wait_for(all_done, timeout=60)
        status = subprocess.run(
            [sys.executable, "-m", "jobq", "status"],
            env={**os.environ, **POOLED, "DATABASE_URL": pooled, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stderr.decode()
        assert (await c.get("/readyz")).status_code == 200
    assert (
        await check.fetchval(
            "SELECT count(*) FROM (SELECT job_id FROM executions GROUP BY job_id"
            " HAVING count(*) > 1) AS twice"
        )
        == 0
    )
    text = log.read_text(errors="replace")
    assert "prepared statement" not in text
    assert "Traceback" not in text


async def test_a_running_job_is_cancelled_within_a_second_through_transaction_pooling(
    stack: tuple[str, Path], check: asyncpg.Connection
) -> None:
    base, _ = stack
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        job = (await c.post("/jobs", json={"kind": "sleep", "payload": {"seconds": 60}})).json()

        async def running() -> bool:
            return (await c.get(f"/jobs/{job['id']}")).json()["status"] == "running"

        await wait_for(running, timeout=30)
        asked = time.monotonic()
        assert (await c.post(f"/jobs/{job['id']}/cancel")).status_code == 202

        async def cancelled() -> bool:
            return (await c.get(f"/jobs/{job['id']}")).json()["status"] == "cancelled"

        await wait_for(cancelled, timeout=1.0)
    assert time.monotonic() - asked < 1.0


async def test_an_idempotent_replay_through_transaction_pooling_returns_the_same_job(
    stack: tuple[str, Path],
) -> None:
    base, _ = stack
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"kind": "sleep", "payload": {"seconds": 0}}
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        first = await c.post("/jobs", json=body, headers=key)
        replays = await asyncio.gather(
            *(c.post("/jobs", json=body, headers=key) for _ in range(10))
        )
    assert first.status_code == 201
    assert {r.status_code for r in replays} == {200}
    assert {r.json()["id"] for r in replays} == {first.json()["id"]}


async def test_concurrent_migrations_through_transaction_pooling_apply_each_version_once(
    ports: tuple[int, int],
) -> None:
    versions = [m.version for m in schema.available()]

    async def pooled_conn(name: str) -> asyncpg.Connection:
        return await db.connect(tcp_dsn("127.0.0.1", ports[1], name), pooler="transaction")

    for _round in range(5):
        name = await _new_database(ports[0])
        conns = [
            await db.connect(tcp_dsn("127.0.0.1", ports[1], name), pooler="transaction")
            for _ in range(6)
        ]
        try:
            async with asyncio.timeout(30):  # a hung migration fails the test, not the suite
                guard = functools.partial(pooled_conn, name)
                results = await asyncio.gather(*(schema.migrate(c, connect=guard) for c in conns))
        finally:
            for c in conns:
                await c.close()
        assert sorted(v for r in results for v in r) == versions
        direct = await asyncpg.connect(tcp_dsn("127.0.0.1", ports[0], name))
        try:
            rows = await direct.fetch("SELECT version FROM jobq_schema_migrations ORDER BY 1")
            assert [r["version"] for r in rows] == versions
            # This database's only: the module's API and workers take theirs in another.
            locks = await direct.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            assert locks == 0
        finally:
            await direct.close()


async def test_a_worker_whose_listen_cannot_receive_warns_once_and_polls(
    pooled: str, check: asyncpg.Connection
) -> None:
    from tests.servers import free_port

    metrics_port = free_port()
    worker = worker_process(
        pooled,
        "tests.registries:recording",
        "--metrics-port",
        str(metrics_port),
        env={**POOLED, "JOBQ_POLL_INTERVAL_SECONDS": "0.2"},
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(timeout=5) as c:

            async def poll_only() -> bool:
                try:
                    body = (await c.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
                except httpx.TransportError:
                    return False
                return "jobq_worker_poll_only 1.0" in body

            await wait_for(poll_only, timeout=30, interval=0.1)
        job = await check.fetchval(
            "INSERT INTO jobs (kind, payload) VALUES ('sleep', '{\"seconds\": 0}') RETURNING id"
        )

        async def done() -> bool:
            return bool(
                await check.fetchval(
                    f"SELECT status = 'succeeded' FROM {ALL_JOBS} WHERE id = $1", job
                )
            )

        await wait_for(done, timeout=15)
    finally:
        stop(worker)
    assert worker.stderr is not None
    with worker.stderr:
        err = worker.stderr.read().decode()
    warnings = [line for line in err.splitlines() if "JOBQ_LISTEN_DATABASE_URL" in line]
    assert len(warnings) == 1, err


async def test_a_waiter_behind_transaction_pooling_polls_and_still_sees_the_job_end(
    pooled: str, direct: str
) -> None:
    # LISTEN through the pooler hears nothing: the watcher's self-check says so and it reads
    # the waited jobs every POLL_SECONDS instead; the wait still ends when the job does.
    pool = await db.create_pool(pooled, min_size=1, max_size=4, pooler="transaction")
    try:
        queue = Queue(pool, pooler="transaction")
        await queue.enqueue(NewJob("wait.me", queue="pooled-wait"))
        (job,) = await queue.claim("w", ["wait.me"], ["pooled-wait"], 1, lease_seconds=60)
        waiting = asyncio.create_task(queue.wait(job.id, timeout=30))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        await queue.complete(lease_of(job), {"done": True})
        ended = await asyncio.wait_for(waiting, 15)
        assert ended.status == "succeeded"
        assert queue._watcher.poll_only
    finally:
        await pool.close()
