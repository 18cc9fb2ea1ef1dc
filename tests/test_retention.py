"""Retention: history leaves created ahead, expired leaves removed by one worker at a time with
their counts, half-done removals finished, idempotency keys expired. History rows are written
by SQL here, as a job's end would write them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import pytest

from jobq import examples, maintenance
from jobq.maintenance import Cleaner, Partitioner
from jobq.queue import Queue, history
from jobq.settings import Settings
from jobq.worker import Worker
from tests.helpers import wait_for

DAY = timedelta(days=1)

INSERT_HISTORY = """
INSERT INTO jobs_history (id, kind, queue, payload, status, priority, attempts, max_attempts,
                          run_at, cancel_requested, errors, created_at, started_at, finished_at)
SELECT jobq_uuid_v7(), $1, 'default', '{}', $2, 0, 1, 3, $3, false, '[]', $3, $3, $3
FROM generate_series(1, $4)
"""

COUNTED = """
SELECT status, sum(n)::bigint AS n FROM (
    SELECT status, n FROM jobq_counts UNION ALL SELECT status, n FROM jobq_count_deltas
) AS c GROUP BY status HAVING sum(n) <> 0
"""


async def reset_history(pool: asyncpg.Pool) -> None:
    """No leaves, no jobs, no counts, no keys."""
    for row in await pool.fetch("SELECT name FROM jobq_history_partitions"):
        await pool.execute(f'DROP TABLE IF EXISTS "{row["name"]}"')
    await pool.execute("DELETE FROM jobq_history_partitions")
    await pool.execute(
        "TRUNCATE jobs, jobq_counts, jobq_count_deltas, jobq_finished_minutes,"
        " jobq_idempotency_keys"
    )


@pytest.fixture
async def db(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    await reset_history(pool)
    yield pool


async def make_leaf(pool: asyncpg.Pool, cls: str, at: datetime, width: timedelta = DAY) -> str:
    name: str = await pool.fetchval(
        "SELECT jobq_history_ensure_partition($1, $2, $3)", cls, at, width
    )
    return name


async def add_history(pool: asyncpg.Pool, status: str, at: datetime, n: int = 1) -> None:
    await pool.execute(INSERT_HISTORY, "echo", status, at, n)


async def counted(pool: asyncpg.Pool) -> dict[str, int]:
    return {r["status"]: r["n"] for r in await pool.fetch(COUNTED)}


async def exists(pool: asyncpg.Pool, table: str) -> bool:
    return bool(await pool.fetchval("SELECT to_regclass($1) IS NOT NULL", table))


async def now(pool: asyncpg.Pool) -> datetime:
    value: datetime = await pool.fetchval("SELECT now()")
    return value


def cleaner(pool: asyncpg.Pool, **settings: object) -> Cleaner:
    return Cleaner(Queue(pool), Settings(**settings))  # type: ignore[arg-type]


async def test_a_leaf_past_retention_is_dropped_by_the_cleaner_and_its_rows_leave_the_counts(
    db: asyncpg.Pool,
) -> None:
    t = await now(db)
    old = await make_leaf(db, "done", t - 10 * DAY)
    kept = await make_leaf(db, "done", t)
    await add_history(db, "succeeded", t - 10 * DAY, 5)
    await add_history(db, "succeeded", t, 2)
    assert (await counted(db))["succeeded"] == 7

    report = await cleaner(db, retention=7 * DAY).clean()

    assert report is not None
    assert [(r.leaf.name, r.rows) for r in report.leaves] == [(old, 5)]
    assert not await exists(db, old)
    assert await exists(db, kept)
    registered = "SELECT count(*) FROM jobq_history_partitions WHERE name = $1"
    assert await db.fetchval(registered, old) == 0
    assert await counted(db) == {"succeeded": 2}


async def test_a_leaf_is_kept_until_its_whole_range_is_past_retention(db: asyncpg.Pool) -> None:
    t = await now(db)
    # The horizon (now - 7 days) falls inside this leaf: some of its rows are still wanted.
    leaf = await make_leaf(db, "done", t - 7 * DAY + timedelta(minutes=1))
    report = await cleaner(db, retention=7 * DAY).clean()
    assert report is not None and not report.leaves
    assert await exists(db, leaf)


async def test_retention_off_keeps_every_leaf(db: asyncpg.Pool) -> None:
    t = await now(db)
    leaf = await make_leaf(db, "failed", t - 400 * DAY)
    await cleaner(db, retention=None, retention_failed=None).clean()
    assert await exists(db, leaf)


async def test_failed_jobs_are_kept_for_their_own_retention(db: asyncpg.Pool) -> None:
    t = await now(db)
    done = await make_leaf(db, "done", t - 10 * DAY)
    failed = await make_leaf(db, "failed", t - 10 * DAY)
    await cleaner(db, retention=7 * DAY, retention_failed=30 * DAY).clean()
    assert not await exists(db, done)
    assert await exists(db, failed)


async def _wait_for_detach_waiting(pool: asyncpg.Pool) -> None:
    async def waiting() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%DETACH PARTITION%'"
                " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
            )
        )

    await wait_for(waiting, timeout=10)


async def test_only_one_of_two_concurrent_passes_removes_a_leaf(db: asyncpg.Pool) -> None:
    t = await now(db)
    old = await make_leaf(db, "done", t - 10 * DAY)
    await add_history(db, "succeeded", t - 10 * DAY, 3)
    # A reader in the class table keeps the first pass's detach waiting, inside its pass.
    async with db.acquire() as reader, reader.transaction():
        await reader.fetch("SELECT 1 FROM jobs_history_done LIMIT 1")
        first = asyncio.create_task(cleaner(db, retention=7 * DAY).clean())
        await _wait_for_detach_waiting(db)
        second = await cleaner(db, retention=7 * DAY).clean()
    first_report = await asyncio.wait_for(first, 10)
    assert second is None  # skipped: the first pass holds the retention lock
    assert first_report is not None
    assert [r.leaf.name for r in first_report.leaves] == [old]
    assert await counted(db) == {}


async def test_a_leaf_detached_but_not_dropped_is_dropped_by_the_next_pass(
    db: asyncpg.Pool,
) -> None:
    t = await now(db)
    old = await make_leaf(db, "done", t - 10 * DAY)
    await add_history(db, "cancelled", t - 10 * DAY, 4)
    # What a pass that died right after its detach leaves behind.
    await db.execute(f'ALTER TABLE jobs_history_done DETACH PARTITION "{old}" CONCURRENTLY')

    report = await cleaner(db, retention=7 * DAY).clean()

    assert report is not None
    assert [(r.leaf.name, r.rows) for r in report.leaves] == [(old, 4)]
    assert not await exists(db, old)
    assert await counted(db) == {}


async def test_a_detach_interrupted_midway_is_finalized_by_the_next_pass(
    db: asyncpg.Pool,
) -> None:
    t = await now(db)
    old = await make_leaf(db, "failed", t - 40 * DAY)
    await add_history(db, "failed_permanent", t - 40 * DAY, 2)
    async with db.acquire() as reader, db.acquire() as detacher, reader.transaction():
        await reader.fetch("SELECT 1 FROM jobs_history_failed LIMIT 1")
        # Cancelled while it waits for the reader: the leaf stays half-detached.
        await detacher.execute("SET statement_timeout = '500ms'")
        with pytest.raises(asyncpg.exceptions.QueryCanceledError):
            await detacher.execute(
                f'ALTER TABLE jobs_history_failed DETACH PARTITION "{old}" CONCURRENTLY'
            )
        await detacher.execute("RESET statement_timeout")
    states = {leaf.name: leaf.state for leaf in await history.leaves(db)}
    assert states[old] == "detaching"

    report = await cleaner(db, retention_failed=30 * DAY).clean()

    assert report is not None
    assert [(r.leaf.name, r.rows) for r in report.leaves] == [(old, 2)]
    assert not await exists(db, old)
    assert await counted(db) == {}


async def test_the_partitioner_creates_leaves_two_widths_ahead_for_both_classes(
    db: asyncpg.Pool,
) -> None:
    made = await Partitioner(Queue(db), Settings()).create_ahead()
    assert len(made) == 6
    t = await now(db)
    for cls in ("done", "failed"):
        covered = await db.fetchval(
            "SELECT min(lower_bound) <= $2 AND max(upper_bound) > $3 AND count(*) = 3"
            " FROM jobq_history_partitions WHERE class = $1",
            cls,
            t,
            t + 2 * DAY,
        )
        assert covered, cls
    # A job ending two days from now has its leaf.
    await add_history(db, "succeeded", t + 2 * DAY)


async def test_a_second_partitioner_pass_creates_nothing(db: asyncpg.Pool) -> None:
    partitioner = Partitioner(Queue(db), Settings())
    await partitioner.create_ahead()
    assert await partitioner.create_ahead() == []


async def test_short_retention_gets_one_minute_leaves_and_frequent_passes(
    db: asyncpg.Pool,
) -> None:
    partitioner = Partitioner(
        Queue(db), Settings(retention=timedelta(minutes=2), retention_failed=timedelta(minutes=2))
    )
    await partitioner.create_ahead()
    widths = await db.fetch(
        "SELECT class, upper_bound - lower_bound AS width FROM jobq_history_partitions"
    )
    assert len(widths) == 6
    assert {w["width"] for w in widths} == {timedelta(minutes=1)}
    assert partitioner.interval <= 15


SHORT = Settings(retention=timedelta(minutes=2), retention_failed=timedelta(minutes=2))


async def test_empty_day_wide_leaves_are_replaced_by_narrow_ones_when_retention_is_short(
    db: asyncpg.Pool,
) -> None:
    t = await now(db)
    for cls in ("done", "failed"):  # what `jobq migrate` makes on a fresh install
        for days in range(3):
            await make_leaf(db, cls, t + days * DAY)
    await Partitioner(Queue(db), SHORT).create_ahead()
    widths = await db.fetch(
        "SELECT class, upper_bound - lower_bound AS width, upper_bound FROM jobq_history_partitions"
        " WHERE upper_bound <= now() + interval '3 minutes'"
    )
    assert {w["class"] for w in widths} == {"done", "failed"}
    assert {w["width"] for w in widths} == {timedelta(minutes=1)}


async def test_a_wide_leaf_that_holds_rows_is_kept_when_retention_is_short(
    db: asyncpg.Pool,
) -> None:
    t = await now(db)
    wide = await make_leaf(db, "done", t)
    await add_history(db, "succeeded", t)
    await Partitioner(Queue(db), SHORT).create_ahead()
    assert await exists(db, wide)
    assert await db.fetchval("SELECT count(*) FROM jobs_history") == 1


async def test_a_worker_makes_narrow_leaves_before_its_first_claim(
    db: asyncpg.Pool, dsn: str
) -> None:
    t = await now(db)
    for cls in ("done", "failed"):  # what `jobq migrate` makes on a fresh install
        await make_leaf(db, cls, t)
    worker = Worker(dsn, examples.registry, settings=SHORT)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.wait_started(), 10)
        width = await db.fetchval(
            "SELECT upper_bound - lower_bound FROM jobq_history_partitions"
            " WHERE class = 'done' AND lower_bound <= now() AND now() < upper_bound"
        )
        assert width == timedelta(minutes=1)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)


async def test_the_partitioner_and_the_cleaner_are_services(queue: Queue) -> None:
    services = maintenance.services(queue, Settings())
    names = {s.name: s.interval for s in services}
    assert names["cleaner"] == 30.0
    assert names["partitioner"] == 300.0


async def test_a_key_expires_only_past_its_window_and_once_its_job_is_gone(
    db: asyncpg.Pool,
) -> None:
    t = await now(db)
    await make_leaf(db, "done", t)
    live = await db.fetchval("INSERT INTO jobs (kind, payload) VALUES ('echo', '{}') RETURNING id")
    await add_history(db, "succeeded", t)
    finished = await db.fetchval("SELECT id FROM jobs_history")
    gone = await db.fetchval("SELECT jobq_uuid_v7()")
    await db.execute("DELETE FROM jobq_idempotency_keys")
    await db.executemany(
        "INSERT INTO jobq_idempotency_keys (key, job_id, fingerprint, created_at, expires_at)"
        " VALUES ($1, $2, 'fp', $3, $4)",
        [
            ("expired-gone", gone, t - 2 * DAY, t - DAY),
            ("expired-live", live, t - 2 * DAY, t - DAY),
            ("expired-finished", finished, t - 2 * DAY, t - DAY),
            ("in-window-gone", gone, t, t + DAY),
        ],
    )

    report = await cleaner(db).clean()

    assert report is not None and report.keys == 1
    kept = {r["key"] for r in await db.fetch("SELECT key FROM jobq_idempotency_keys")}
    assert kept == {"expired-live", "expired-finished", "in-window-gone"}


async def test_a_pass_that_removed_something_logs_one_line_with_leaves_rows_and_bytes(
    db: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    t = await now(db)
    old = await make_leaf(db, "done", t - 10 * DAY)
    await add_history(db, "succeeded", t - 10 * DAY, 3)
    with caplog.at_level(logging.INFO, logger="jobq.worker"):
        await cleaner(db, retention=7 * DAY).clean()
        await cleaner(db, retention=7 * DAY).clean()  # nothing left: no line
    lines = [r for r in caplog.records if getattr(r, "service", None) == "cleaner"]
    assert len(lines) == 1
    line = lines[0]
    assert "1 history leaf" in line.getMessage() and "3 row(s)" in line.getMessage()
    assert (line.leaves, line.rows) == (old, 3)  # type: ignore[attr-defined]
    assert line.bytes > 0  # type: ignore[attr-defined]


async def test_a_dropped_leaf_takes_the_expired_keys_of_its_jobs_with_it(
    db: asyncpg.Pool,
) -> None:
    t = await now(db)
    await make_leaf(db, "done", t - 10 * DAY)
    await db.execute(INSERT_HISTORY, "echo", "succeeded", t - 10 * DAY, 2)
    ids = [r["id"] for r in await db.fetch("SELECT id FROM jobs_history ORDER BY id")]
    await db.execute(
        "UPDATE jobs_history SET idempotency_key = 'key-' || id WHERE id = ANY($1)", ids
    )
    await db.execute("DELETE FROM jobq_idempotency_keys")
    await db.executemany(
        "INSERT INTO jobq_idempotency_keys (key, job_id, fingerprint, created_at, expires_at)"
        " VALUES ($1, $2, 'fp', $3, $4)",
        [(f"key-{ids[0]}", ids[0], t - 11 * DAY, t - 10 * DAY),
         (f"key-{ids[1]}", ids[1], t - 11 * DAY, t + DAY)],
    )  # fmt: skip

    report = await cleaner(db, retention=7 * DAY).clean()

    assert report is not None and report.keys == 1
    kept = [r["key"] for r in await db.fetch("SELECT key FROM jobq_idempotency_keys")]
    assert kept == [f"key-{ids[1]}"]  # its window is not over: it stays until then


async def test_a_cleaner_scans_expired_keys_on_from_where_its_last_pass_stopped(
    db: asyncpg.Pool,
) -> None:
    t = await now(db)
    await db.execute(
        "INSERT INTO jobq_idempotency_keys (key, job_id, fingerprint, created_at, expires_at)"
        " SELECT 'k' || lpad(i::text, 6, '0'), jobq_uuid_v7(), 'fp', $1, $2"
        " FROM generate_series(1, $3) AS i",
        t - 2 * DAY,
        t - DAY,
        history.BATCH_SIZE + 1,
    )
    cursor = history.KeyCursor()
    assert await history.expire_keys(db, cursor, max_batches=1) == history.BATCH_SIZE
    assert not cursor.caught_up
    assert await history.expire_keys(db, cursor, max_batches=1) == 1
    assert cursor.caught_up
    # A key that expires later is found by the next pass of the same cursor.
    await db.execute(
        "INSERT INTO jobq_idempotency_keys (key, job_id, fingerprint, created_at, expires_at)"
        " VALUES ('later', jobq_uuid_v7(), 'fp', $1, $2)",
        t - DAY,
        t - timedelta(seconds=1),
    )
    assert await history.expire_keys(db, cursor, max_batches=1) == 1
    assert await db.fetchval("SELECT count(*) FROM jobq_idempotency_keys") == 0
