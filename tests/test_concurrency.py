"""Concurrency: idempotency races, many workers on many jobs, cancel storms, claim order,
and fencing of a worker that was paused past its lease."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from jobq import chaos
from jobq.api import create_app
from jobq.queue import NewJob, Queue
from jobq.settings import Settings
from tests.helpers import ALL_JOBS, wait_for, worker_process

pytestmark = pytest.mark.timeout(300)

FAST = {
    "JOBQ_HEARTBEAT_SECONDS": "0.3",
    "JOBQ_RESCUE_INTERVAL_SECONDS": "0.3",
    "JOBQ_POLL_INTERVAL_SECONDS": "0.1",
    "JOBQ_CANCEL_GRACE_SECONDS": "0.2",
}


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


async def _statuses(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch(f"SELECT status, count(*)::int AS n FROM {ALL_JOBS} GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


# -- idempotency --------------------------------------------------------------------------


@pytest.fixture
async def client(queue: Queue) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(), pool=queue.pool)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://jobq.test") as c:
        yield c


async def test_two_hundred_concurrent_posts_with_one_idempotency_key_create_one_job(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    body = {"kind": "echo", "payload": {"order": 42}}
    responses = await asyncio.gather(
        *(client.post("/jobs", json=body, headers={"Idempotency-Key": "race"}) for _ in range(200))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 199 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 1


# -- many workers -------------------------------------------------------------------------


async def test_three_workers_of_sixteen_run_each_of_five_thousand_jobs_exactly_once(
    queue: Queue, dsn: str
) -> None:
    await queue.pool.execute(chaos._CREATE_SIDE_TABLE)
    await queue.pool.execute(f"TRUNCATE {chaos.SIDE_TABLE}")
    rng = random.Random(5)
    await queue.enqueue_many(
        [
            NewJob(kind=chaos.KIND, queue=chaos.QUEUE, payload={"ms": rng.randint(0, 20)})
            for _ in range(5000)
        ]
    )
    procs = [
        worker_process(
            dsn, "jobq.chaos:registry", "--queues", chaos.QUEUE, "--concurrency", "16", env=FAST
        )
        for _ in range(3)
    ]
    try:

        async def all_done() -> bool:
            return await _statuses(queue.pool) == {"succeeded": 5000}

        await wait_for(all_done, timeout=180, interval=0.2)
        assert all(p.poll() is None for p in procs), "a worker crashed"
    finally:
        _stop(*procs)
    runs = await queue.pool.fetchrow(
        f"SELECT count(*) AS n, count(DISTINCT job_id) AS jobs, count(DISTINCT pid) AS pids"
        f" FROM {chaos.SIDE_TABLE}"
    )
    assert runs is not None
    assert (runs["n"], runs["jobs"]) == (5000, 5000)
    assert runs["pids"] == 3  # every worker took part
    assert await queue.pool.fetchval(f"SELECT max(attempts) FROM {ALL_JOBS}") == 1


async def test_a_cancel_storm_ends_with_every_job_succeeded_or_cancelled(
    queue: Queue, dsn: str
) -> None:
    rng = random.Random(7)
    ids = await queue.enqueue_many(
        [NewJob(kind="sleep", payload={"seconds": rng.uniform(0.05, 0.4)}) for _ in range(600)]
    )
    procs = [
        worker_process(dsn, "jobq.examples:registry", "--concurrency", "16", env=FAST)
        for _ in range(3)
    ]
    try:

        async def some_running() -> bool:
            return (await _statuses(queue.pool)).get("running", 0) > 0

        await wait_for(some_running, timeout=30)
        to_cancel = rng.sample(ids, 300)
        outcomes = []
        for job_id in to_cancel:
            outcomes.append((await queue.request_cancel(job_id)).outcome.value)
            await asyncio.sleep(0.002)

        async def settled() -> dict[str, int] | None:
            statuses = await _statuses(queue.pool)
            live = {s for s in statuses if s in ("queued", "running", "retrying")}
            return None if live else statuses

        final = await wait_for(settled, timeout=120, interval=0.1)
    finally:
        _stop(*procs)
    assert set(final) <= {"succeeded", "cancelled"}, final
    assert sum(final.values()) == 600
    assert "pending" in outcomes, "no running job was cancelled: the storm missed its target"
    rows = await queue.pool.fetch(f"SELECT id FROM {ALL_JOBS} WHERE status = 'cancelled'")
    cancelled = {r["id"] for r in rows}
    assert cancelled <= set(to_cancel), "a job nobody cancelled ended cancelled"


# -- claim order ----------------------------------------------------------------------------


async def test_a_worker_claims_by_priority_then_due_time(queue: Queue, dsn: str) -> None:
    now = datetime.now(UTC)
    rng = random.Random(11)
    specs = [(rng.choice([-5, 0, 0, 3, 10]), now - timedelta(seconds=rng.randint(1, 500)))
             for _ in range(40)]  # fmt: skip
    await queue.enqueue_many(
        [NewJob(kind="echo", priority=p, run_at=at, payload={"i": i})
         for i, (p, at) in enumerate(specs)]
    )  # fmt: skip
    proc = worker_process(dsn, "tests.reliab_handlers:registry", "--concurrency", "1", env=FAST)
    try:

        async def all_done() -> bool:
            return await _statuses(queue.pool) == {"succeeded": 40}

        await wait_for(all_done, timeout=60)
    finally:
        _stop(proc)
    rows = await queue.pool.fetch(f"SELECT priority, run_at FROM {ALL_JOBS} ORDER BY started_at")
    order = [(r["priority"], r["run_at"]) for r in rows]
    assert order == sorted(order)


# -- fencing --------------------------------------------------------------------------------

LEASE = {**FAST, "JOBQ_LEASE_SECONDS": "1"}


async def _row(pool: asyncpg.Pool, job_id: object) -> dict[str, object]:
    row = await pool.fetchrow(f"SELECT * FROM {ALL_JOBS} WHERE id = $1", job_id)
    assert row is not None
    return dict(row)


async def _held_by(pool: asyncpg.Pool, job_id: object, proc: subprocess.Popen[bytes]) -> bool:
    row = await _row(pool, job_id)
    owner = str(row["lease_owner"] or "")
    return row["status"] == "running" and f":{proc.pid}:" in owner


def _resume_and_stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGCONT, then a graceful stop: by its exit the worker has tried every write it had."""
    os.kill(proc.pid, signal.SIGCONT)
    proc.terminate()
    return proc.wait(30)


async def test_a_worker_paused_past_its_lease_cannot_overwrite_the_rescued_runs_outcome(
    queue: Queue, dsn: str
) -> None:
    job = (await queue.enqueue(NewJob(kind="slow_first", payload={"first": 2.5}))).job
    first = worker_process(dsn, "tests.reliab_handlers:registry", env=LEASE)
    second: subprocess.Popen[bytes] | None = None
    try:
        await wait_for(lambda: _held_by(queue.pool, job.id, first), timeout=30)
        os.kill(first.pid, signal.SIGSTOP)
        second = worker_process(dsn, "tests.reliab_handlers:registry", env=LEASE)

        async def finished_elsewhere() -> bool:
            return (await _row(queue.pool, job.id))["status"] == "succeeded"

        await wait_for(finished_elsewhere, timeout=60)
        settled = await _row(queue.pool, job.id)
        assert settled["result"] == {"pid": second.pid, "attempt": 2}

        assert _resume_and_stop(first) == 0
        assert await _row(queue.pool, job.id) == settled
    finally:
        os.kill(first.pid, signal.SIGCONT) if first.poll() is None else None
        _stop(first, *([second] if second else []))


async def test_a_worker_paused_past_its_lease_cannot_complete_a_job_cancelled_meanwhile(
    queue: Queue, dsn: str
) -> None:
    job = (await queue.enqueue(NewJob(kind="slow_first", payload={"first": 2.5}))).job
    worker = worker_process(dsn, "tests.reliab_handlers:registry", env=LEASE)
    try:
        await wait_for(lambda: _held_by(queue.pool, job.id, worker), timeout=30)
        os.kill(worker.pid, signal.SIGSTOP)
        assert (await queue.request_cancel(job.id)).outcome.value == "pending"

        async def cancelled_by_rescue() -> bool:
            await queue.rescue()
            return (await _row(queue.pool, job.id))["status"] == "cancelled"

        await wait_for(cancelled_by_rescue, timeout=30, interval=0.1)
        settled = await _row(queue.pool, job.id)

        assert _resume_and_stop(worker) == 0
        assert await _row(queue.pool, job.id) == settled
    finally:
        os.kill(worker.pid, signal.SIGCONT) if worker.poll() is None else None
        _stop(worker)
