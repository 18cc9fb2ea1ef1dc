"""Database outages: the API answers 503 and recovers; workers ride out a restart.

These tests stop and restart a PostgreSQL server of their own (see `owned_postgres`).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from jobq import db, examples, worker
from jobq.api import create_app
from jobq.embedded import EmbeddedPostgres
from jobq.queue import NewJob, Queue
from jobq.settings import Settings
from jobq.worker import Worker
from tests import owned_postgres
from tests.helpers import ALL_JOBS, NO_JOBS, wait_for, worker_process

own_server = owned_postgres.own_server
own_dsn = owned_postgres.own_dsn

PROBLEM = "application/problem+json"
JOB_ID = "01900000-0000-7000-8000-000000000000"


@pytest.fixture(scope="module")
async def api_pool(own_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    # As the app makes it: min_size=0, so it starts while the database is down.
    pool = await db.create_pool(own_dsn, min_size=0, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def client(api_pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    app: FastAPI = create_app(Settings(), pool=api_pool)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://jobq.test") as c:
        yield c


@pytest.fixture
def database_down(own_server: EmbeddedPostgres) -> Iterator[EmbeddedPostgres]:
    """The database is stopped for the test and started again afterwards."""
    own_server.stop()
    try:
        yield own_server
    finally:
        own_server.start()


async def _db_up(dsn: str) -> bool:
    try:
        conn = await asyncpg.connect(dsn)
    except Exception as exc:
        if db.is_unavailable(exc):
            return False
        raise
    await conn.close()
    return True


# -- the API ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/jobs", None),
        ("POST", "/jobs", {"kind": "echo"}),
        ("GET", f"/jobs/{JOB_ID}", None),
        ("POST", f"/jobs/{JOB_ID}/cancel", None),
        ("POST", f"/jobs/{JOB_ID}/retry", None),
    ],
)
async def test_job_routes_answer_503_problem_with_retry_after_while_the_database_is_down(
    client: httpx.AsyncClient, database_down: EmbeddedPostgres, method: str, path: str, body: object
) -> None:
    response = await client.request(method, path, json=body)
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM
    assert int(response.headers["retry-after"]) > 0
    problem = response.json()
    assert problem["status"] == 503
    assert problem["error"] == "database_unavailable"
    assert "Traceback" not in response.text


async def test_readyz_is_503_while_the_database_is_down(
    client: httpx.AsyncClient, database_down: EmbeddedPostgres
) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable"}


async def test_healthz_stays_200_while_the_database_is_down(
    client: httpx.AsyncClient, database_down: EmbeddedPostgres
) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200


async def test_metrics_are_served_while_the_database_is_down(
    client: httpx.AsyncClient, database_down: EmbeddedPostgres
) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert "jobq_" in response.text


async def test_api_works_again_after_the_database_comes_back_without_a_restart(
    client: httpx.AsyncClient, own_server: EmbeddedPostgres, own_dsn: str
) -> None:
    assert (await client.get("/jobs")).status_code == 200  # the pool holds connections
    own_server.stop()
    assert (await client.get("/jobs")).status_code == 503
    assert (await client.get("/readyz")).status_code == 503
    own_server.start()

    async def ready() -> bool:
        return (await client.get("/readyz")).status_code == 200

    await wait_for(ready)
    created = await client.post("/jobs", json={"kind": "echo", "payload": {"back": True}})
    assert created.status_code == 201
    fetched = await client.get(f"/jobs/{created.json()['id']}")
    assert fetched.status_code == 200
    assert fetched.json()["payload"] == {"back": True}


async def test_requests_beyond_the_pool_size_wait_for_a_connection_instead_of_failing(
    own_dsn: str,
) -> None:
    pool = await db.create_pool(own_dsn, min_size=0, max_size=2)
    try:
        app = create_app(Settings(), pool=pool)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jobq.test") as c:
            responses = await asyncio.gather(
                *(c.post("/jobs", json={"kind": "echo", "payload": {"i": i}}) for i in range(100)),
                *(c.get("/jobs?limit=5") for _ in range(100)),
            )
    finally:
        await pool.close()
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 201}, statuses


# -- workers ------------------------------------------------------------------------------

FAST_LEASES = {
    "JOBQ_LEASE_SECONDS": "30",
    "JOBQ_HEARTBEAT_SECONDS": "0.5",
    "JOBQ_RESCUE_INTERVAL_SECONDS": "0.5",
}


@pytest.fixture
async def queue(own_dsn: str) -> AsyncIterator[Queue]:
    pool = await db.create_pool(own_dsn, min_size=0, max_size=4)
    try:
        await pool.execute(NO_JOBS)
        yield Queue(pool)
    finally:
        await pool.close()


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def _statuses(queue: Queue) -> dict[str, int]:
    async def read() -> list[asyncpg.Record]:
        sql = f"SELECT status, count(*)::int AS n FROM {ALL_JOBS} GROUP BY 1"
        return await queue.pool.fetch(sql)

    try:
        rows = await read()
    except Exception as exc:
        if db.is_unavailable(exc):
            return {}
        raise
    return {r["status"]: r["n"] for r in rows}


async def test_worker_keeps_running_through_a_database_restart_and_finishes_every_job(
    queue: Queue, own_server: EmbeddedPostgres, own_dsn: str
) -> None:
    await queue.enqueue_many([NewJob(kind="sleep", payload={"seconds": 0.01}) for _ in range(300)])
    proc = worker_process(own_dsn, "jobq.examples:registry", "--concurrency", "4", env=FAST_LEASES)
    try:

        async def some_done() -> bool:
            return (await _statuses(queue)).get("succeeded", 0) >= 20

        await wait_for(some_done, timeout=30)
        own_server.restart()

        async def all_done() -> bool:
            return (await _statuses(queue)) == {"succeeded": 300}

        await wait_for(all_done, timeout=60)
        assert proc.poll() is None, "the worker exited"
    finally:
        assert _stop(proc) == 0


async def test_worker_listens_again_after_a_database_restart(
    queue: Queue, own_server: EmbeddedPostgres, own_dsn: str
) -> None:
    # Polling is slow on purpose: only a NOTIFY (or the wake-up after reconnecting) can make
    # the worker claim within the wait below.
    env = {**FAST_LEASES, "JOBQ_POLL_INTERVAL_SECONDS": "300"}
    proc = worker_process(own_dsn, "jobq.examples:registry", env=env)
    try:
        first = await queue.enqueue(NewJob(kind="echo"))

        async def done(job_id: object) -> bool:
            try:
                return (await queue.get(job_id)).status == "succeeded"  # type: ignore[arg-type]
            except Exception as exc:
                if db.is_unavailable(exc):
                    return False
                raise

        await wait_for(lambda: done(first.job.id), timeout=30)
        own_server.restart()
        await wait_for(lambda: _db_up(own_dsn))
        for i in range(3):
            job = await _enqueue_retrying(queue, NewJob(kind="echo", payload={"i": i}))
            await wait_for(lambda job=job: done(job), timeout=30)
    finally:
        assert _stop(proc) == 0


async def _enqueue_retrying(queue: Queue, new: NewJob) -> object:
    async def attempt() -> object:
        try:
            return (await queue.enqueue(new)).job.id
        except Exception as exc:
            if db.is_unavailable(exc):
                return None
            raise

    return await wait_for(attempt)


async def test_a_completion_that_could_not_be_written_is_retried_after_the_outage(
    queue: Queue, own_server: EmbeddedPostgres, own_dsn: str
) -> None:
    job = (await queue.enqueue(NewJob(kind="sleep", payload={"seconds": 0.3}))).job
    proc = worker_process(own_dsn, "jobq.examples:registry", env=FAST_LEASES)
    try:

        async def running() -> bool:
            return (await queue.get(job.id)).status == "running"

        await wait_for(running, timeout=30)
        own_server.stop()
        # The handler finishes while the database is away (the outage outlasts it).
        await asyncio.sleep(1.5)
        own_server.start()

        async def succeeded() -> object:
            try:
                row = await queue.get(job.id)
            except Exception as exc:
                if db.is_unavailable(exc):
                    return None
                raise
            return row if row.status == "succeeded" else None

        row = await wait_for(succeeded, timeout=30)
        # Written by the same run: not rescued and run again (the lease is 30 s).
        assert row.attempts == 1
        assert row.errors == []
        assert proc.poll() is None
    finally:
        assert _stop(proc) == 0


# -- shutting down while the database is away -------------------------------------------

# A long lease: what bounds the shutdown below is the shutdown deadline, not the lease.
LONG_LEASE = Settings(
    poll_interval_seconds=0.1,
    heartbeat_seconds=0.5,
    lease_seconds=20,
    rescue_interval_seconds=600,
)


async def _stop_with_the_database_down(
    queue: Queue, own_server: EmbeddedPostgres, own_dsn: str, *, signals: int
) -> tuple[float, uuid.UUID]:
    """Run a 60 s job, stop the database, then ask the worker to stop `signals` times."""
    job = (await queue.enqueue(NewJob(kind="sleep", payload={"seconds": 60}, max_attempts=1))).job
    w = Worker(own_dsn, examples.registry, settings=LONG_LEASE, shutdown_grace=0.3)
    task = asyncio.create_task(w.run())
    try:
        await asyncio.wait_for(w.wait_started(), 30)

        async def running() -> bool:
            return (await queue.get(job.id)).status == "running"

        await wait_for(running, timeout=30)
        own_server.stop()
        asked = time.monotonic()
        for _ in range(signals):
            w.request_stop()
        await asyncio.wait_for(task, 60)
        return time.monotonic() - asked, job.id
    finally:
        if not task.done():
            task.cancel()
        own_server.start()


async def test_a_second_stop_while_the_database_is_down_exits_at_once(
    queue: Queue, own_server: EmbeddedPostgres, own_dsn: str
) -> None:
    took, job_id = await _stop_with_the_database_down(queue, own_server, own_dsn, signals=2)
    assert took < 3  # not the 20 s lease the release used to be retried for
    # Nothing could be written: the job is still leased to the stopped worker.
    row = await queue.get(job_id)
    assert (row.status, row.attempts) == ("running", 1)


async def test_a_stop_while_the_database_is_down_gives_up_at_the_shutdown_deadline(
    queue: Queue, own_server: EmbeddedPostgres, own_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "SHUTDOWN_WRITE_SECONDS", 1.0)
    took, _ = await _stop_with_the_database_down(queue, own_server, own_dsn, signals=1)
    assert took < 0.3 + 1.0 + 2  # the grace, the write deadline, scheduling


async def test_an_attempt_whose_release_could_not_be_written_counts_once_rescued(
    queue: Queue, own_server: EmbeddedPostgres, own_dsn: str
) -> None:
    _, job_id = await _stop_with_the_database_down(queue, own_server, own_dsn, signals=2)
    await queue.pool.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", job_id
    )
    await queue.rescue()
    row = await queue.get(job_id)
    # Indistinguishable from a worker that crashed mid-run: the attempt is spent.
    assert (row.status, row.attempts) == ("failed_permanent", 1)
    assert "worker lost" in (row.last_error or "")
