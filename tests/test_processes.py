"""Worker processes as they run in production: several at once, stopped by signals."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
import uuid

import asyncpg
import httpx

from jobq.queue import NewJob, Queue
from tests.helpers import ALL_JOBS, wait_for, worker_process
from tests.registries import EXECUTIONS_DDL

FAST_ENV = {
    "JOBQ_POLL_INTERVAL_SECONDS": "0.2",
    "JOBQ_RESCUE_INTERVAL_SECONDS": "0.5",
}


async def _succeeded(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {ALL_JOBS} WHERE status = 'succeeded'"))


def _stop(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    return [p.wait(timeout=60) for p in procs]


async def test_three_worker_processes_run_each_of_1000_jobs_exactly_once(
    queue: Queue, dsn: str
) -> None:
    await queue.pool.execute(EXECUTIONS_DDL)
    await queue.pool.execute("TRUNCATE executions")
    procs = [
        worker_process(dsn, "tests.registries:recording", "--concurrency", "8", env=FAST_ENV)
        for _ in range(3)
    ]
    try:
        await wait_for(lambda: _workers_connected(queue.pool, 3), timeout=60, interval=0.1)
        await queue.enqueue_many(
            [NewJob(kind="record", payload={"i": i, "sleep_ms": 2}) for i in range(1000)]
        )
        await wait_for(lambda: _all_succeeded(queue.pool, 1000), timeout=120, interval=0.2)
    finally:
        codes = _stop(procs)
    assert codes == [0, 0, 0]
    runs = await queue.pool.fetch(
        "SELECT job_id, count(*) AS n FROM executions GROUP BY job_id HAVING count(*) > 1"
    )
    assert runs == []
    assert await queue.pool.fetchval("SELECT count(DISTINCT job_id) FROM executions") == 1000
    assert await queue.pool.fetchval("SELECT count(DISTINCT pid) FROM executions") == 3


async def _workers_connected(pool: asyncpg.Pool, n: int) -> bool:
    connected = await pool.fetchval(
        "SELECT count(DISTINCT application_name) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE 'jobq worker %'"
    )
    return bool(connected == n)


async def _all_succeeded(pool: asyncpg.Pool, n: int) -> bool:
    return await _succeeded(pool) == n


async def test_sigterm_lets_a_running_job_finish_and_exits_zero(queue: Queue, dsn: str) -> None:
    job = (await queue.enqueue(NewJob(kind="sleep", payload={"seconds": 1}))).job
    proc = worker_process(dsn, "tests.registries:recording", "--shutdown-grace", "30", env=FAST_ENV)
    try:
        await wait_for(lambda: _status(queue, job.id, "running"), timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    row = await queue.get(job.id)
    assert row.status == "succeeded"


async def test_sigterm_past_the_grace_period_requeues_without_counting(
    queue: Queue, dsn: str
) -> None:
    job = (await queue.enqueue(NewJob(kind="sleep", payload={"seconds": 60}))).job
    proc = worker_process(
        dsn, "tests.registries:recording", "--shutdown-grace", "0.3", env=FAST_ENV
    )
    try:
        await wait_for(lambda: _status(queue, job.id, "running"), timeout=30)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 30
    finally:
        if proc.poll() is None:
            proc.kill()
    row = await queue.get(job.id)
    assert (row.status, row.attempts) == ("queued", 0)


async def test_sigterm_past_the_grace_exits_on_time_while_a_sync_handler_still_runs(
    queue: Queue, dsn: str
) -> None:
    job = (await queue.enqueue(NewJob(kind="sync_sleep", payload={"seconds": 30}))).job
    proc = worker_process(
        dsn,
        "tests.registries:recording",
        "--shutdown-grace",
        "0.3",
        env=FAST_ENV,
        stderr=subprocess.PIPE,
    )
    try:
        await wait_for(lambda: _status(queue, job.id, "running"), timeout=30)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert took < 10  # the grace and the writes, not the 30 s the thread still had to run
    assert b"cannot be interrupted" in err
    # Left leased, not released: the lease expires and the rescue returns it.
    row = await queue.get(job.id)
    assert (row.status, row.attempts) == ("running", 1)


async def test_a_killed_worker_s_job_is_rescued_by_another(queue: Queue, dsn: str) -> None:
    env = {**FAST_ENV, "JOBQ_LEASE_SECONDS": "1", "JOBQ_HEARTBEAT_SECONDS": "0.3"}
    job = (await queue.enqueue(NewJob(kind="sleep", payload={"seconds": 2}))).job
    doomed = worker_process(dsn, "tests.registries:recording", env=env)
    try:
        await wait_for(lambda: _status(queue, job.id, "running"), timeout=30)
        doomed.kill()
        doomed.wait(timeout=10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    rescuer = worker_process(dsn, "tests.registries:recording", env=env)
    try:
        await wait_for(lambda: _status(queue, job.id, "succeeded"), timeout=60)
    finally:
        _stop([rescuer])
    row = await queue.get(job.id)
    assert row.attempts == 2
    assert "worker lost" in row.errors[0]["error"]


async def _status(queue: Queue, job_id: uuid.UUID, status: str) -> bool:
    return (await queue.get(job_id)).status == status


async def test_a_worker_serves_its_own_metrics(queue: Queue, dsn: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = (await queue.enqueue(NewJob(kind="record", payload={}))).job
    await queue.pool.execute(EXECUTIONS_DDL)
    proc = worker_process(
        dsn, "tests.registries:recording", "--metrics-port", str(port), env=FAST_ENV
    )
    try:
        await wait_for(lambda: _status(queue, job.id, "succeeded"), timeout=30)

        async def scraped() -> str | None:
            try:
                async with httpx.AsyncClient() as client:
                    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            except httpx.TransportError:
                return None
            return text if 'outcome="succeeded"' in text else None

        text = await wait_for(scraped, timeout=10)
    finally:
        _stop([proc])
    assert "jobq_worker_jobs_in_flight" in text
    assert 'jobq_jobs_finished_total{kind="record",outcome="succeeded"} 1.0' in text
