"""Flow control across worker processes: a pause reaches every worker within a second and
holds across restarts; limits hold with several workers claiming at once (checked from the
start and finish times the handlers record themselves)."""

from __future__ import annotations

import signal
import subprocess
from collections import defaultdict
from datetime import timedelta

import asyncpg

from jobq.queue import NewJob, Queue
from tests.flow_handlers import SPANS_DDL
from tests.helpers import ALL_JOBS, wait_for, worker_process

REGISTRY = "tests.flow_handlers:registry"
FAST_ENV = {"JOBQ_POLL_INTERVAL_SECONDS": "0.2", "JOBQ_RESCUE_INTERVAL_SECONDS": "0.5"}


def _workers(dsn: str, n: int, concurrency: int = 4) -> list[subprocess.Popen[bytes]]:
    return [
        worker_process(
            dsn,
            REGISTRY,
            "--concurrency",
            str(concurrency),
            "--queues",
            "default,capped",
            env=FAST_ENV,
        )
        for _ in range(n)
    ]


def _stop(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    return [p.wait(timeout=60) for p in procs]


async def _connected(pool: asyncpg.Pool, n: int) -> bool:
    connected = await pool.fetchval(
        "SELECT count(DISTINCT application_name) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name LIKE 'jobq worker %'"
    )
    return bool(connected == n)


async def _spans(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM spans"))


async def _succeeded(pool: asyncpg.Pool, n: int) -> bool:
    done = await pool.fetchval(f"SELECT count(*) FROM {ALL_JOBS} WHERE status = 'succeeded'")
    return bool(done == n)


async def _fresh(queue: Queue) -> None:
    await queue.pool.execute(SPANS_DDL)
    await queue.pool.execute("TRUNCATE spans")


async def test_a_pause_stops_every_worker_process_within_a_second(queue: Queue, dsn: str) -> None:
    await _fresh(queue)
    procs = _workers(dsn, 2)
    try:
        await wait_for(lambda: _connected(queue.pool, 2), timeout=60, interval=0.1)
        await queue.enqueue_many(
            [NewJob(kind="span", payload={"seconds": 0.05}) for _ in range(200)]
        )
        await wait_for(lambda: _spans(queue.pool), timeout=30)
        await queue.pause("queue", "default")
        paused_at = await queue.pool.fetchval("SELECT now()")
        later = (await queue.enqueue(NewJob(kind="span"))).job  # enqueue goes on
        await wait_for(
            lambda: queue.pool.fetchval("SELECT now() > $1", paused_at + timedelta(seconds=1.5)),
            timeout=5,
        )
        last_start = await queue.pool.fetchval("SELECT max(started) FROM spans")
        assert last_start < paused_at + timedelta(seconds=1)
        waiting = await queue.pool.fetchval("SELECT count(*) FROM jobs WHERE status = 'queued'")
        assert waiting > 0 and (await queue.get(later.id)).status == "queued"
        await queue.resume("queue", "default")
        await wait_for(lambda: _succeeded(queue.pool, 201), timeout=60, interval=0.2)
    finally:
        codes = _stop(procs)
    assert codes == [0, 0]


async def test_a_pause_holds_across_a_worker_restart(queue: Queue, dsn: str) -> None:
    await _fresh(queue)
    await queue.pause("queue", "default")
    await queue.enqueue_many([NewJob(kind="span", payload={"seconds": 0}) for _ in range(5)])
    procs = _workers(dsn, 1)  # started while paused: it claims nothing
    try:
        await wait_for(lambda: _connected(queue.pool, 1), timeout=60, interval=0.1)
        started = await queue.pool.fetchval("SELECT now()")
        await wait_for(
            lambda: queue.pool.fetchval("SELECT now() > $1", started + timedelta(seconds=1)),
            timeout=5,
        )
        assert await _spans(queue.pool) == 0
    finally:
        assert _stop(procs) == [0]
    procs = _workers(dsn, 1)  # its successor claims once resumed
    try:
        await queue.resume("queue", "default")
        await wait_for(lambda: _succeeded(queue.pool, 5), timeout=60, interval=0.1)
    finally:
        _stop(procs)


def _most_at_once(spans: list[asyncpg.Record]) -> int:
    edges = sorted([(s["started"], 1) for s in spans] + [(s["finished"], -1) for s in spans],
                   key=lambda e: (e[0], e[1]))  # fmt: skip
    most = running = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


async def test_limits_hold_with_three_worker_processes_claiming_at_once(
    queue: Queue, dsn: str
) -> None:
    await _fresh(queue)
    procs = _workers(dsn, 3, concurrency=10)
    try:
        await wait_for(lambda: _connected(queue.pool, 3), timeout=60, interval=0.1)
        await queue.enqueue_many(
            [NewJob(kind="span", queue="capped", payload={"seconds": 0.05}) for _ in range(60)]
            + [NewJob(kind="keyed", payload={"seconds": 0.05, "tenant": f"t{i % 4}"},
                      concurrency_key=f"t{i % 4}") for i in range(80)]
        )  # fmt: skip
        await wait_for(lambda: _succeeded(queue.pool, 140), timeout=60, interval=0.2)
    finally:
        _stop(procs)
    spans = await queue.pool.fetch("SELECT tenant, started, finished FROM spans")
    capped = [s for s in spans if s["tenant"] is None]
    assert len(capped) == 60 and _most_at_once(capped) <= 3
    by_tenant: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for s in spans:
        if s["tenant"] is not None:
            by_tenant[s["tenant"]].append(s)
    assert {t: _most_at_once(s) <= 2 for t, s in by_tenant.items()} == {
        f"t{i}": True for i in range(4)
    }
