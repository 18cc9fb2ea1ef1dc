"""Operator views from the rollups: counts, finished per minute, failing kinds, unhandled jobs
and queue lag, and the compaction that keeps the rollups small, over a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from jobq import db, schema
from jobq.api import create_app
from jobq.maintenance import rollups, services
from jobq.queue import Job, NewJob, Queue, lease_of
from jobq.queue.views import _UNHANDLED
from jobq.settings import Settings
from tests.conftest import create_database, drop_database, with_database
from tests.helpers import wait_for

Counts = dict[tuple[str, str, str], int]

_TRUE_COUNTS = """
SELECT queue, kind, status, count(*)::bigint AS n
FROM (SELECT queue, kind, status FROM jobs
      UNION ALL
      SELECT queue, kind, status FROM jobs_history) AS j
GROUP BY queue, kind, status
"""

_ROLLUP_COUNTS = """
SELECT queue, kind, status, sum(n)::bigint AS n
FROM (SELECT queue, kind, status, n FROM jobq_counts
      UNION ALL
      SELECT queue, kind, status, n FROM jobq_count_deltas) AS c
GROUP BY queue, kind, status
HAVING sum(n) <> 0
"""


async def true_counts(pool: asyncpg.Pool) -> Counts:
    return {(r["queue"], r["kind"], r["status"]): r["n"] for r in await pool.fetch(_TRUE_COUNTS)}


async def rollup_counts(pool: asyncpg.Pool) -> Counts:
    rows = await pool.fetch(_ROLLUP_COUNTS)
    return {(r["queue"], r["kind"], r["status"]): r["n"] for r in rows}


def uuid7(at: datetime) -> uuid.UUID:
    """A UUIDv7 whose time prefix is `at`: ids in a chosen creation order."""
    ms = int(at.timestamp() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a, rand_b = (rand >> 62) & 0xFFF, rand & ((1 << 62) - 1)
    return uuid.UUID(int=(ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)


async def db_now(pool: asyncpg.Pool) -> datetime:
    now: datetime = await pool.fetchval("SELECT now()")
    return now


async def insert_history(
    pool: asyncpg.Pool,
    kind: str,
    status: str,
    finished_at: datetime,
    *,
    error: str | None = None,
    queue: str = "default",
    job_id: uuid.UUID | None = None,
) -> uuid.UUID:
    """A finished job written straight into history, as the completion statements do."""
    job_id = job_id or uuid7(finished_at - timedelta(seconds=1))
    cls = "failed" if status == "failed_permanent" else "done"
    await pool.execute(
        "SELECT jobq_history_ensure_partition($1, $2, interval '1 day')", cls, finished_at
    )
    await pool.execute(
        "INSERT INTO jobs_history (id, kind, queue, payload, status, priority, attempts,"
        " max_attempts, run_at, cancel_requested, last_error, errors, created_at, started_at,"
        " finished_at)"
        " VALUES ($1, $2, $3, '{}', $4, 0, 1, 1, $5, false, $6, '[]', $5, $5, $5)",
        job_id,
        kind,
        queue,
        status,
        finished_at,
        error,
    )
    return job_id


async def claim(queue: Queue, kinds: list[str], queues: list[str], n: int) -> list[Job]:
    return await queue.claim("w", kinds, queues, n, lease_seconds=30)


async def mixed_workload(queue: Queue, *, compact_between: bool) -> None:
    """Every path that changes a job's status, and an operator's own SQL."""
    pool = queue.pool

    async def step() -> None:
        if compact_between:
            assert await rollups.compact(pool)
        assert await rollup_counts(pool) == await true_counts(pool)

    await queue.enqueue(NewJob(kind="a"))
    await queue.enqueue(NewJob(kind="a", queue="mail", idempotency_key="mixed-1"))
    await queue.enqueue_many(
        [NewJob(kind=k, queue=q, max_attempts=2) for k in ("a", "b") for q in ("default", "mail")]
        * 5
    )
    await step()
    jobs = await claim(queue, ["a", "b"], ["default", "mail"], 12)
    assert len(jobs) == 12
    await step()
    await queue.complete(lease_of(jobs[0]))
    await queue.complete_many([(lease_of(j), "null") for j in jobs[1:3]])
    assert await queue.fail(jobs[3], "RuntimeError: once") == "retrying"
    assert await queue.fail(jobs[4], "RuntimeError: for good", permanent=True) == (
        "failed_permanent"
    )
    assert await queue.fail_permanently(lease_of(jobs[5]), "ValueError: bad") == (
        "failed_permanent"
    )
    assert await queue.mark_cancelled(lease_of(jobs[6]))
    assert await queue.release([lease_of(jobs[7])])
    await queue.heartbeat([lease_of(j) for j in jobs[8:]], lease_seconds=60)
    await step()
    await queue.retry(jobs[4].id)
    waiting = await pool.fetchval("SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1")
    await queue.request_cancel(waiting)
    await pool.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
        jobs[8].id,
    )
    assert len(await queue.rescue()) == 1
    await step()
    # An operator's SQL: moving a kind to another queue, deleting jobs by hand.
    await pool.execute("UPDATE jobs SET queue = 'moved' WHERE kind = 'b' AND status = 'queued'")
    await pool.execute("DELETE FROM jobs WHERE kind = 'a' AND queue = 'mail' AND status = 'queued'")
    await insert_history(pool, "c", "succeeded", await db_now(pool))
    await pool.execute("DELETE FROM jobs_history WHERE kind = 'c'")
    await insert_history(pool, "c", "cancelled", await db_now(pool))
    await step()


async def test_the_rollup_equals_a_count_of_jobs_after_every_kind_of_change(
    queue: Queue,
) -> None:
    await mixed_workload(queue, compact_between=False)

    assert await rollup_counts(queue.pool) == await true_counts(queue.pool)
    assert await queue.pool.fetchval("SELECT count(*) FROM jobq_counts") == 0


async def test_the_rollup_equals_a_count_of_jobs_with_compaction_in_between(
    queue: Queue,
) -> None:
    await mixed_workload(queue, compact_between=True)
    assert await rollups.compact(queue.pool)

    assert await queue.pool.fetchval("SELECT count(*) FROM jobq_count_deltas") == 0
    counted = {
        (r["queue"], r["kind"], r["status"]): r["n"]
        for r in await queue.pool.fetch("SELECT * FROM jobq_counts")
    }
    assert counted == await true_counts(queue.pool)


async def test_concurrent_writers_and_compaction_keep_the_rollup_exact(queue: Queue) -> None:
    pool = queue.pool
    writers_done = asyncio.Event()

    async def writer(name: str) -> None:
        for i in range(15):
            await queue.enqueue_many([NewJob(kind="race", payload={"i": i}) for _ in range(20)])
            jobs = await queue.claim(name, ["race"], ["default"], 15, lease_seconds=30)
            await queue.complete_many([(lease_of(j), "null") for j in jobs[:10]])
            for job in jobs[10:12]:
                await queue.fail(job, "RuntimeError: race")
            await queue.release([lease_of(j) for j in jobs[12:]])

    async def compactor() -> int:
        passes = 0
        while not writers_done.is_set():
            passes += await rollups.compact(pool)
            await asyncio.sleep(0.005)  # pacing only: correctness does not depend on it
        return passes

    compacting = asyncio.create_task(compactor())
    try:
        await asyncio.gather(writer("w1"), writer("w2"))
        # A rebuild from scratch while nothing writes must agree with what the deltas gave.
        assert await rollup_counts(pool) == await true_counts(pool)
        await pool.execute("SELECT jobq_counts_rebuild()")
    finally:
        writers_done.set()
        passes = await compacting

    assert passes > 0
    expected = await true_counts(pool)
    assert sum(expected.values()) == 2 * 15 * 20
    assert await rollup_counts(pool) == expected


async def test_a_rebuild_over_compacted_counts_gives_the_same_counts(queue: Queue) -> None:
    await queue.enqueue_many([NewJob(kind="echo") for _ in range(3)])
    assert await rollups.compact(queue.pool)
    await queue.enqueue(NewJob(kind="echo"))

    await queue.pool.execute("SELECT jobq_counts_rebuild()")

    assert await queue.pool.fetchval("SELECT count(*) FROM jobq_count_deltas") == 0
    assert await rollup_counts(queue.pool) == {("default", "echo", "queued"): 4}


async def test_counts_read_the_rollup_not_the_jobs(queue: Queue) -> None:
    await queue.enqueue_many([NewJob(kind="echo"), NewJob(kind="echo"), NewJob(kind="x")])
    # A count the rollup holds for jobs that are not there: proof of where counts come from.
    await queue.pool.execute(
        "INSERT INTO jobq_counts (queue, kind, status, n) VALUES ('ghost', 'k', 'queued', 7)"
    )

    assert sorted(await queue.counts()) == [("default", "queued", 3), ("ghost", "queued", 7)]


async def test_counts_leave_out_pairs_whose_jobs_are_all_gone(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="gone", queue="brief"))
    await queue.pool.execute("DELETE FROM jobs WHERE queue = 'brief'")

    assert await queue.counts() == []
    assert await rollups.compact(queue.pool)
    assert await queue.pool.fetchval("SELECT count(*) FROM jobq_counts") == 0


async def test_finished_per_minute_counts_each_minute_of_the_window_by_final_status(
    queue: Queue,
) -> None:
    now = await db_now(queue.pool)
    await insert_history(queue.pool, "echo", "succeeded", now - timedelta(minutes=3))
    await insert_history(queue.pool, "echo", "succeeded", now - timedelta(minutes=3))
    await insert_history(queue.pool, "echo", "failed_permanent", now - timedelta(minutes=1))
    await insert_history(queue.pool, "echo", "cancelled", now)
    await insert_history(queue.pool, "echo", "succeeded", now - timedelta(minutes=40))

    def minute(at: datetime) -> datetime:
        return at.replace(second=0, microsecond=0)

    for _ in range(2):  # before and after compaction: the same answer
        rows = await queue.finished_per_minute(15)
        assert len(rows) == 15
        assert [r.minute for r in rows] == sorted(r.minute for r in rows)
        seen = {r.minute: (r.succeeded, r.failed, r.cancelled) for r in rows}
        assert seen.pop(minute(now - timedelta(minutes=3))) == (2, 0, 0)
        assert seen.pop(minute(now - timedelta(minutes=1))) == (0, 1, 0)
        assert seen.pop(minute(now)) == (0, 0, 1)
        assert set(seen.values()) == {(0, 0, 0)}
        assert await rollups.compact(queue.pool)

    assert (
        await queue.pool.fetchval(
            "SELECT count(*) FROM jobq_finished_minutes WHERE minute = $1",
            minute(now - timedelta(minutes=3)),
        )
        == 1
    )


async def test_compaction_forgets_minutes_older_than_a_day(queue: Queue) -> None:
    now = await db_now(queue.pool)
    await insert_history(queue.pool, "echo", "succeeded", now - timedelta(days=1, minutes=5))
    await insert_history(queue.pool, "echo", "succeeded", now - timedelta(hours=23))

    assert await rollups.compact(queue.pool)

    kept = await queue.pool.fetch("SELECT minute FROM jobq_finished_minutes")
    assert [r["minute"] for r in kept] == [
        (now - timedelta(hours=23)).replace(second=0, microsecond=0)
    ]


async def test_compaction_skips_while_another_session_holds_the_rollup_lock(
    queue: Queue,
) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    async with queue.pool.acquire() as other, other.transaction():
        await other.execute("SELECT pg_advisory_xact_lock(hashtext('jobq_counts'))")
        assert not await rollups.compact(queue.pool)
        assert await queue.pool.fetchval("SELECT count(*) FROM jobq_count_deltas") == 1

    assert await rollups.compact(queue.pool)
    assert await queue.pool.fetchval("SELECT count(*) FROM jobq_count_deltas") == 0


async def test_the_compaction_loop_folds_deltas_until_cancelled(queue: Queue) -> None:
    await queue.enqueue_many([NewJob(kind="echo") for _ in range(3)])
    loop = asyncio.create_task(rollups.compact_forever(queue.pool, interval=0.05))
    try:

        async def folded() -> bool:
            return bool(await queue.pool.fetchval("SELECT count(*) = 0 FROM jobq_count_deltas"))

        await wait_for(folded)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert await queue.counts() == [("default", "queued", 3)]


async def test_the_api_compacts_the_rollups_on_its_primary(
    queue: Queue, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollups, "INTERVAL_SECONDS", 0.05)
    await queue.enqueue_many([NewJob(kind="echo") for _ in range(2)])
    app = create_app(Settings(), dsn=dsn)

    async def folded() -> bool:
        return bool(await queue.pool.fetchval("SELECT count(*) = 0 FROM jobq_count_deltas"))

    async with app.router.lifespan_context(app):
        await wait_for(folded)
    assert await queue.counts() == [("default", "queued", 2)]


def test_workers_run_rollup_compaction_as_a_maintenance_service(queue: Queue) -> None:
    names = [s.name for s in services(queue, Settings())]
    assert "rollups" in names


async def fail_retrying(queue: Queue, kind: str, error: str) -> Job:
    await queue.enqueue(NewJob(kind=kind, max_attempts=3))
    (job,) = await claim(queue, [kind], ["default"], 1)
    assert await queue.fail(job, error) == "retrying"
    return job


async def test_failing_kinds_rank_failed_and_retrying_jobs_with_the_latest_error(
    queue: Queue,
) -> None:
    now = await db_now(queue.pool)
    first = await insert_history(
        queue.pool, "hist", "failed_permanent", now - timedelta(minutes=2), error="old"
    )
    latest = await insert_history(
        queue.pool, "hist", "failed_permanent", now - timedelta(minutes=1), error="new"
    )
    assert first < latest
    await insert_history(
        queue.pool, "hist", "failed_permanent", now - timedelta(minutes=1),
        job_id=uuid7(now - timedelta(minutes=10)),
    )  # fmt: skip
    await insert_history(
        queue.pool, "both", "failed_permanent", now - timedelta(minutes=5), error="in history"
    )
    retried = await fail_retrying(queue, "both", "RuntimeError: retrying now")
    await fail_retrying(queue, "retry", "RuntimeError: try again")
    await insert_history(
        queue.pool, "stale", "failed_permanent", now - timedelta(minutes=30), error="long ago"
    )

    failing = await queue.failing_kinds(15, 5)

    assert [(f.kind, f.failed, f.retrying) for f in failing] == [
        ("hist", 3, 0),
        ("both", 1, 1),
        ("retry", 0, 1),
    ]
    by_kind = {f.kind: f for f in failing}
    assert by_kind["both"].last_error == "RuntimeError: retrying now"
    assert by_kind["both"].last_job_id == retried.id
    assert by_kind["retry"].last_error == "RuntimeError: try again"
    hist = by_kind["hist"]
    assert (hist.last_error, hist.last_job_id) == ("new", latest)
    assert hist.last_failed_at == now - timedelta(minutes=1)
    assert [f.kind for f in await queue.failing_kinds(15, 2)] == ["hist", "both"]


async def test_failing_kinds_skip_a_kind_whose_failed_jobs_are_gone(queue: Queue) -> None:
    now = await db_now(queue.pool)
    await insert_history(queue.pool, "retried", "failed_permanent", now, error="x")
    await insert_history(queue.pool, "kept", "failed_permanent", now, error="y")
    # Gone from history (retried, pruned), still counted as failed in that minute.
    await queue.pool.execute("DELETE FROM jobs_history WHERE kind = 'retried'")

    failing = await queue.failing_kinds(15, 5)

    assert [(f.kind, f.last_error) for f in failing] == [("kept", "y")]


async def test_failing_kinds_read_failed_rows_version_3_left_in_jobs(admin_dsn: str) -> None:
    # During the deploy (pre-deploy steps only) a version-3 worker ends a job in place: the row
    # stays in `jobs` until the post-deploy move, and the update trigger counts it as finished.
    name = await create_database(admin_dsn, "views_v3", template="template0")
    try:
        conn = await db.connect(with_database(admin_dsn, name))
        try:
            await schema.migrate(conn, target=5)
            job_id = await conn.fetchval(
                "INSERT INTO jobs (kind, max_attempts) VALUES ('v3', 1) RETURNING id"
            )
            await conn.execute(
                "UPDATE jobs SET status = 'failed_permanent', attempts = 1,"
                " last_error = 'v3 says no', finished_at = now(), updated_at = now()"
                " WHERE id = $1",
                job_id,
            )
            pool = await db.create_pool(with_database(admin_dsn, name), min_size=1, max_size=2)
            try:
                failing = await Queue(pool).failing_kinds(15, 5)
            finally:
                await pool.close()
        finally:
            await conn.close()
    finally:
        await drop_database(admin_dsn, name)

    assert [(f.kind, f.failed, f.last_error, f.last_job_id) for f in failing] == [
        ("v3", 1, "v3 says no", job_id)
    ]


async def test_unhandled_counts_waiting_pairs_no_live_worker_takes_with_the_oldest_job(
    queue: Queue,
) -> None:
    await queue.pool.execute("TRUNCATE jobq_workers")
    oldest = (await queue.enqueue(NewJob(kind="orphan", queue="q1"))).job
    await queue.enqueue_many([NewJob(kind="orphan", queue="q1") for _ in range(2)])
    await queue.enqueue_many([NewJob(kind="other", queue="q1") for _ in range(5)])
    await queue.enqueue(NewJob(kind="handled", queue="q1"))
    await queue.worker_seen("w-live", ["handled"], ["q1"], 4, ttl_seconds=30)

    unhandled = await queue.unhandled()

    assert [(u.queue, u.kind, u.count) for u in unhandled] == [
        ("q1", "other", 5),
        ("q1", "orphan", 3),
    ]
    assert unhandled[1].oldest_created_at == oldest.created_at


async def test_unhandled_finds_a_due_job_behind_many_future_ones_without_reading_them(
    queue: Queue,
) -> None:
    await queue.pool.execute("TRUNCATE jobq_workers")
    later = await db_now(queue.pool) + timedelta(days=1)
    await queue.enqueue_many([NewJob(kind="later", run_at=later) for _ in range(20_000)])
    orphan = (await queue.enqueue(NewJob(kind="orphan"))).job
    await queue.worker_seen("w-live", ["later"], ["default"], 4, ttl_seconds=30)
    await queue.pool.execute("ANALYZE jobs")

    unhandled = await queue.unhandled()
    plan = await queue.pool.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {_UNHANDLED}")

    assert [(u.kind, u.oldest_created_at) for u in unhandled] == [("orphan", orphan.created_at)]
    # 20,000 jobs fill some 400 heap pages and 100 index pages; the first in line is a few
    # pages away.
    top = (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]
    assert top["Shared Hit Blocks"] + top["Shared Read Blocks"] < 100


async def test_oldest_due_is_the_longest_waiting_due_job_whatever_its_priority(
    queue: Queue,
) -> None:
    now = await db_now(queue.pool)
    await queue.enqueue(
        NewJob(kind="echo", queue="p", priority=-3, run_at=now + timedelta(hours=1))
    )
    await queue.enqueue(
        NewJob(kind="echo", queue="p", priority=-3, run_at=now - timedelta(seconds=5))
    )
    await queue.enqueue(
        NewJob(kind="echo", queue="p", priority=7, run_at=now - timedelta(minutes=2))
    )
    await queue.enqueue(
        NewJob(kind="echo", queue="p", priority=0, run_at=now - timedelta(seconds=30))
    )
    await queue.enqueue(NewJob(kind="echo", queue="future", run_at=now + timedelta(hours=1)))

    lags = {lag.queue: lag for lag in await queue.oldest_due()}

    assert set(lags) == {"p"}
    assert lags["p"].oldest_run_at == now - timedelta(minutes=2)
    assert lags["p"].age_seconds >= 120


@pytest.fixture
async def client(queue: Queue) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(), pool=queue.pool)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def test_stats_keeps_its_shape(queue: Queue, client: httpx.AsyncClient) -> None:
    await queue.pool.execute("TRUNCATE jobq_workers")
    await fail_retrying(queue, "flaky", "RuntimeError: later")
    await queue.enqueue(NewJob(kind="orphan"))

    body: dict[str, Any] = (await client.get("/stats")).json()

    assert set(body) == {
        "generated_at", "window_minutes", "queues", "finished_per_minute", "failing_kinds",
        "unhandled", "workers", "paused_kinds", "limits", "schedules",
    }  # fmt: skip
    (q,) = body["queues"]
    assert set(q) == {
        "queue", "counts", "total", "oldest_due_at", "oldest_due_age_seconds", "paused",
        "paused_by",
    }  # fmt: skip
    assert q["counts"] == {
        "queued": 1, "running": 0, "retrying": 1, "succeeded": 0, "failed_permanent": 0,
        "cancelled": 0,
    }  # fmt: skip
    assert set(body["finished_per_minute"][0]) == {
        "minute", "succeeded", "failed_permanent", "cancelled",
    }  # fmt: skip
    (f,) = body["failing_kinds"]
    assert set(f) == {
        "kind", "failed_permanent", "retrying", "last_error", "last_job_id", "last_failed_at",
    }  # fmt: skip
    assert {(u["kind"], u["count"]) for u in body["unhandled"]} == {("orphan", 1), ("flaky", 1)}
    assert set(body["unhandled"][0]) == {"queue", "kind", "count", "oldest_created_at"}
