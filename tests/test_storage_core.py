"""The job lifecycle over the live table and history (docs/storage.md): a job that ends moves
to `jobs_history` in the statement that ends it, readers see it in either place, a retry
moves it back. Against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from jobq import db, schema
from jobq.queue import (
    BulkEnqueued,
    CancelOutcome,
    IdempotencyConflict,
    InvalidJob,
    InvalidTransition,
    Job,
    NewJob,
    Queue,
    fingerprint,
    lease_of,
)
from jobq.queue.lookup import finished_not_before
from tests.conftest import create_database, drop_database, with_database

KINDS = ["echo"]
QUEUES = ["default"]


async def claimed(queue: Queue, n: int = 1, *, max_attempts: int | None = None) -> list[Job]:
    await queue.enqueue_many([NewJob(kind="echo", max_attempts=max_attempts) for _ in range(n)])
    jobs = await queue.claim("w1", KINDS, QUEUES, n, lease_seconds=30)
    assert len(jobs) == n
    return jobs


async def where_is(pool: asyncpg.Pool, job_id: uuid.UUID) -> list[tuple[str, str]]:
    """(table, status) of every row of the job, live or in a leaf of history."""
    rows = await pool.fetch(
        "SELECT 'jobs' AS t, status FROM jobs WHERE id = $1"
        " UNION ALL SELECT tableoid::regclass::text, status FROM jobs_history WHERE id = $1",
        job_id,
    )
    return [(r["t"], r["status"]) for r in rows]


async def drop_leaves(pool: asyncpg.Pool, history_class: str) -> None:
    """Every leaf of one class gone, as retention would leave it (detached, then dropped)."""
    names = await pool.fetch(
        "SELECT name FROM jobq_history_partitions WHERE class = $1", history_class
    )
    for r in names:
        await pool.execute(f"ALTER TABLE jobs_history_{history_class} DETACH PARTITION {r['name']}")
        await pool.execute(f"DROP TABLE {r['name']}")
    await pool.execute("DELETE FROM jobq_history_partitions WHERE class = $1", history_class)


@pytest.fixture
async def deploying(admin_dsn: str) -> AsyncIterator[Queue]:
    """A queue over a database with the pre-deploy steps only: version 3 may still run and
    leave finished rows and keys in `jobs` (the post-deploy steps end that)."""
    name = await create_database(admin_dsn, "core_deploying", template="template0")
    dsn = with_database(admin_dsn, name)
    try:
        conn = await db.connect(dsn)
        try:
            await schema.migrate(conn, pre_deploy=True)
        finally:
            await conn.close()
        pool = await db.create_pool(dsn, min_size=1, max_size=4)
        try:
            yield Queue(pool)
        finally:
            await pool.close()
    finally:
        await drop_database(admin_dsn, name)


async def finished_in_jobs(pool: asyncpg.Pool, status: str) -> uuid.UUID:
    """A finished row as version 3 left it: ended in place, in `jobs`."""
    return await pool.fetchval(  # type: ignore[no-any-return]
        "INSERT INTO jobs (kind, status, attempts, max_attempts, finished_at, last_error)"
        " VALUES ('echo', $1, 1, 1, now(), 'v3') RETURNING id",
        status,
    )


# -- ending a job moves it ---------------------------------------------------------------


async def test_a_completed_job_moves_to_history_with_its_result(queue: Queue) -> None:
    (job,) = await claimed(queue)
    assert await queue.complete(lease_of(job), {"ok": 1})
    assert [t[1] for t in await where_is(queue.pool, job.id)] == ["succeeded"]
    ((table, _),) = await where_is(queue.pool, job.id)
    assert table.startswith("jobs_history_done_")
    stored = await queue.get(job.id)
    assert (stored.status, stored.result, stored.attempts) == ("succeeded", {"ok": 1}, 1)
    assert stored.finished_at is not None and stored.updated_at == stored.finished_at
    assert (stored.lease_token, stored.lease_expires_at) == (None, None)


async def test_a_completion_through_a_lost_lease_moves_nothing(queue: Queue) -> None:
    (job,) = await claimed(queue)
    stale = lease_of(job).__class__(job.id, uuid.uuid4())
    assert not await queue.complete(stale, {"ok": 1})
    assert await where_is(queue.pool, job.id) == [("jobs", "running")]


async def test_a_job_failed_for_good_moves_to_the_failed_class(queue: Queue) -> None:
    (job,) = await claimed(queue, max_attempts=1)
    assert await queue.fail(job, "Boom: no") == "failed_permanent"
    ((table, status),) = await where_is(queue.pool, job.id)
    assert table.startswith("jobs_history_failed_") and status == "failed_permanent"
    stored = await queue.get(job.id)
    assert stored.last_error == "Boom: no"
    assert [e["error"] for e in stored.errors] == ["Boom: no"]


async def test_a_failed_attempt_with_attempts_left_stays_live_retrying(queue: Queue) -> None:
    (job,) = await claimed(queue, max_attempts=3)
    assert await queue.fail(job, "Boom: once") == "retrying"
    assert await where_is(queue.pool, job.id) == [("jobs", "retrying")]


async def test_a_failure_after_a_cancel_request_moves_the_job_cancelled(queue: Queue) -> None:
    (job,) = await claimed(queue, max_attempts=3)
    assert (await queue.request_cancel(job.id)).outcome is CancelOutcome.PENDING
    assert await queue.fail(job, "Boom: stopped") == "cancelled"
    ((table, status),) = await where_is(queue.pool, job.id)
    assert table.startswith("jobs_history_done_") and status == "cancelled"


async def test_a_cancel_request_committed_while_a_failure_waits_ends_the_job_cancelled(
    queue: Queue,
) -> None:
    (job,) = await claimed(queue, max_attempts=3)
    async with queue.pool.acquire() as operator, operator.transaction():
        await operator.execute("UPDATE jobs SET cancel_requested = true WHERE id = $1", job.id)
        failing = asyncio.create_task(queue.fail(job, "Boom: meanwhile"))
        await asyncio.sleep(0.2)  # the failure now waits for the operator's row lock
        assert not failing.done()
    assert await failing == "cancelled"
    assert [s for _, s in await where_is(queue.pool, job.id)] == ["cancelled"]


async def test_a_job_the_worker_stopped_for_a_cancel_moves_to_history(queue: Queue) -> None:
    (job,) = await claimed(queue)
    assert await queue.mark_cancelled(lease_of(job))
    ((table, status),) = await where_is(queue.pool, job.id)
    assert table.startswith("jobs_history_done_") and status == "cancelled"


async def test_a_waiting_job_cancelled_moves_to_history(queue: Queue) -> None:
    job = (await queue.enqueue(NewJob(kind="echo"))).job
    result = await queue.request_cancel(job.id)
    assert result.outcome is CancelOutcome.CANCELLED
    assert (result.job.status, result.job.cancel_requested) == ("cancelled", True)
    assert result.job.finished_at is not None
    assert [s for _, s in await where_is(queue.pool, job.id)] == ["cancelled"]
    assert (await queue.get(job.id)).status == "cancelled"


async def test_a_rescue_that_gives_up_moves_the_job_and_one_that_retries_keeps_it(
    queue: Queue,
) -> None:
    spent, retried = await claimed(queue, 2, max_attempts=1)
    await queue.pool.execute("UPDATE jobs SET max_attempts = 2 WHERE id = $1", retried.id)
    await queue.pool.execute("UPDATE jobs SET lease_expires_at = now() - interval '1 second'")
    rescued = {r.job_id: r.status for r in await queue.rescue()}
    assert rescued == {spent.id: "failed_permanent", retried.id: "retrying"}
    assert [s for _, s in await where_is(queue.pool, spent.id)] == ["failed_permanent"]
    assert await where_is(queue.pool, retried.id) == [("jobs", "retrying")]
    assert (await queue.get(spent.id)).last_error.startswith("worker lost: lease held by w1")  # type: ignore[union-attr]


async def test_a_released_job_asked_to_cancel_moves_and_the_others_wait_again(
    queue: Queue,
) -> None:
    stopping, released = await claimed(queue, 2)
    await queue.request_cancel(stopping.id)
    assert set(await queue.release([lease_of(stopping), lease_of(released)])) == {
        stopping.id,
        released.id,
    }
    assert [s for _, s in await where_is(queue.pool, stopping.id)] == ["cancelled"]
    assert await where_is(queue.pool, released.id) == [("jobs", "queued")]
    assert (await queue.get(stopping.id)).lease_owner is None


@pytest.mark.parametrize("history_class", ["done", "failed"])
async def test_ending_a_job_makes_the_missing_leaf_of_history_and_retries(
    queue: Queue, history_class: str
) -> None:
    await drop_leaves(queue.pool, history_class)
    (job,) = await claimed(queue, max_attempts=1)
    if history_class == "done":
        assert await queue.complete(lease_of(job), "fine")
    else:
        assert await queue.fail(job, "Boom: x") == "failed_permanent"
    assert (await queue.get(job.id)).is_terminal
    leaves = await queue.pool.fetch(
        "SELECT upper_bound - lower_bound AS width FROM jobq_history_partitions"
        " WHERE class = $1 AND lower_bound <= now() AND now() < upper_bound",
        history_class,
    )
    assert [r["width"] for r in leaves] == [queue.history_leaf_width]


async def test_a_waiting_job_cancelled_with_no_leaf_for_today_makes_it(queue: Queue) -> None:
    await drop_leaves(queue.pool, "done")
    job = (await queue.enqueue(NewJob(kind="echo"))).job
    assert (await queue.request_cancel(job.id)).outcome is CancelOutcome.CANCELLED
    assert [s for _, s in await where_is(queue.pool, job.id)] == ["cancelled"]


# -- reading across both places -----------------------------------------------------------


async def test_get_reads_a_finished_row_version_3_left_in_jobs(queue: Queue) -> None:
    job_id = await finished_in_jobs(queue.pool, "succeeded")
    assert (await queue.get(job_id)).status == "succeeded"


async def test_get_finds_a_finished_job_of_a_leaf_older_than_today(queue: Queue) -> None:
    # A job created and ended long ago, in a leaf of its own day: the read's bound (the
    # creation time in the id) keeps that leaf.
    await queue.pool.execute(
        "SELECT jobq_history_ensure_partition('done', now() - interval '40 days', interval '1 day')"
    )
    old_id = await queue.pool.fetchval(
        "SELECT (lpad(to_hex((extract(epoch FROM now() - interval '40 days') * 1000)::bigint),"
        " 12, '0') || '70008000000000000abc')::uuid"
    )
    await queue.pool.execute(
        "INSERT INTO jobs_history (id, kind, queue, payload, status, priority, attempts, run_at,"
        " cancel_requested, errors, created_at, finished_at) VALUES ($1, 'echo', 'default',"
        " '{}', 'succeeded', 0, 1, now(), false, '[]', now() - interval '40 days',"
        " now() - interval '40 days' + interval '1 second')",
        old_id,
    )
    assert (await queue.get(old_id)).status == "succeeded"


async def test_lists_merge_live_and_history_newest_first_by_id(queue: Queue) -> None:
    done = await claimed(queue, 3)
    for job in done:
        await queue.complete(lease_of(job))
    waiting = [(await queue.enqueue(NewJob(kind="echo"))).job for _ in range(3)]
    ids = sorted([j.id for j in done + waiting], reverse=True)
    assert [j.id for j in (await queue.list_jobs()).jobs] == ids
    assert [j.id for j in (await queue.list_summaries()).jobs] == ids
    assert [j.id for j in (await queue.list_jobs(offset=2, limit=2)).jobs] == ids[2:4]
    succeeded = await queue.list_jobs(status="succeeded")
    assert [j.id for j in succeeded.jobs] == sorted([j.id for j in done], reverse=True)
    assert [j.id for j in (await queue.list_jobs(status="queued")).jobs] == [
        j.id for j in reversed(waiting)
    ]


async def test_a_list_by_final_status_includes_rows_version_3_left_in_jobs(
    deploying: Queue,
) -> None:
    queue = deploying
    legacy = await finished_in_jobs(queue.pool, "failed_permanent")
    (job,) = await claimed(queue, max_attempts=1)
    await queue.fail(job, "Boom: new")
    page = await queue.list_summaries(status="failed_permanent")
    assert [j.id for j in page.jobs] == [job.id, legacy]


async def test_a_cursor_pages_across_live_and_history_without_gaps_or_repeats(
    queue: Queue,
) -> None:
    for job in await claimed(queue, 7):
        await queue.complete(lease_of(job))
    await queue.enqueue_many([NewJob(kind="echo") for _ in range(6)])
    seen: list[uuid.UUID] = []
    cursor = None
    while True:
        page = await queue.list_jobs(limit=4, cursor=cursor)
        seen += [j.id for j in page.jobs]
        if (cursor := page.next_cursor) is None:
            break
    assert seen == sorted(seen, reverse=True) and len(set(seen)) == 13


async def test_a_cursor_made_by_version_3_is_still_accepted(queue: Queue) -> None:
    jobs = [(await queue.enqueue(NewJob(kind="echo"))).job for _ in range(3)]
    v3 = base64.urlsafe_b64encode(f"{jobs[1].created_at.isoformat()}|{jobs[1].id}".encode())
    page = await queue.list_jobs(cursor=v3.decode().rstrip("="))
    assert [j.id for j in page.jobs] == [jobs[0].id]


async def test_a_list_of_succeeded_jobs_with_a_large_queued_backlog_is_the_newest_succeeded(
    queue: Queue,
) -> None:
    for job in await claimed(queue, 60):
        await queue.complete(lease_of(job))
    await queue.pool.execute(
        "INSERT INTO jobs (kind, run_at) SELECT 'echo', now() + interval '1 day'"
        " FROM generate_series(1, 20000)"
    )
    await queue.pool.execute("ANALYZE jobs")
    page = await queue.list_summaries(status="succeeded", limit=50)
    expected = await queue.pool.fetch(
        "SELECT id FROM jobs_history WHERE status = 'succeeded' ORDER BY id DESC LIMIT 50"
    )
    assert [j.id for j in page.jobs] == [r["id"] for r in expected]
    assert page.next_cursor is not None
    rest = await queue.list_summaries(status="succeeded", limit=50, cursor=page.next_cursor)
    assert len(rest.jobs) == 10 and rest.next_cursor is None


# -- retry and cancel of finished jobs ----------------------------------------------------


async def test_retry_moves_a_failed_job_back_to_the_live_table(queue: Queue) -> None:
    (job,) = await claimed(queue, max_attempts=1)
    await queue.fail(job, "Boom: first")
    retried = await queue.retry(job.id)
    assert (retried.status, retried.attempts, retried.finished_at) == ("queued", 0, None)
    assert [e["error"] for e in retried.errors] == ["Boom: first"]
    assert await where_is(queue.pool, job.id) == [("jobs", "queued")]
    (again,) = await queue.claim("w2", KINDS, QUEUES, 1, lease_seconds=30)
    assert again.id == job.id and again.attempts == 1


async def test_retry_requeues_a_finished_row_version_3_left_in_jobs(queue: Queue) -> None:
    job_id = await finished_in_jobs(queue.pool, "cancelled")
    assert (await queue.retry(job_id)).status == "queued"
    assert await where_is(queue.pool, job_id) == [("jobs", "queued")]


async def test_two_concurrent_retries_move_the_job_once(queue: Queue) -> None:
    (job,) = await claimed(queue, max_attempts=1)
    await queue.fail(job, "Boom: x")
    outcomes = await asyncio.gather(
        queue.retry(job.id), queue.retry(job.id), return_exceptions=True
    )
    retried = [o for o in outcomes if isinstance(o, Job)]
    refused = [o for o in outcomes if isinstance(o, InvalidTransition)]
    assert len(retried) == 1 and len(refused) == 1
    assert refused[0].status == "queued"
    assert await where_is(queue.pool, job.id) == [("jobs", "queued")]


async def test_retry_of_a_succeeded_job_is_an_invalid_transition(queue: Queue) -> None:
    (job,) = await claimed(queue)
    await queue.complete(lease_of(job))
    with pytest.raises(InvalidTransition) as refused:
        await queue.retry(job.id)
    assert refused.value.status == "succeeded"


async def test_cancel_of_a_job_in_history_is_already_terminal(queue: Queue) -> None:
    (job,) = await claimed(queue)
    await queue.complete(lease_of(job), 7)
    result = await queue.request_cancel(job.id)
    assert result.outcome is CancelOutcome.ALREADY_TERMINAL
    assert (result.job.status, result.job.result) == ("succeeded", 7)


async def test_cancel_of_a_finished_row_version_3_left_in_jobs_is_already_terminal(
    queue: Queue,
) -> None:
    job_id = await finished_in_jobs(queue.pool, "failed_permanent")
    assert (await queue.request_cancel(job_id)).outcome is CancelOutcome.ALREADY_TERMINAL


# -- idempotency keys ---------------------------------------------------------------------


async def expire_key(pool: asyncpg.Pool, key: str) -> None:
    await pool.execute(
        "UPDATE jobq_idempotency_keys SET expires_at = now() - interval '1 second' WHERE key = $1",
        key,
    )


async def remove_job(pool: asyncpg.Pool, job_id: uuid.UUID) -> None:
    """The job gone, as retention removes it."""
    await pool.execute("DELETE FROM jobs_history WHERE id = $1", job_id)


async def finish(queue: Queue, key: str) -> Job:
    job = (await queue.enqueue(NewJob(kind="echo", idempotency_key=key))).job
    (running,) = await queue.claim("w1", KINDS, QUEUES, 1, lease_seconds=30)
    assert running.id == job.id
    await queue.complete(lease_of(running), "done")
    return job


async def test_a_key_is_remembered_after_its_job_ended(queue: Queue) -> None:
    job = await finish(queue, "k-ended")
    again = await queue.enqueue(NewJob(kind="echo", idempotency_key="k-ended"))
    assert not again.created
    assert (again.job.id, again.job.status, again.job.result) == (job.id, "succeeded", "done")


async def test_a_key_is_kept_for_the_queues_window_after_creation(queue: Queue) -> None:
    windowed = Queue(queue.pool, idempotency_window=timedelta(hours=2))
    await windowed.enqueue(NewJob(kind="echo", idempotency_key="k-window"))
    kept = await queue.pool.fetchval(
        "SELECT expires_at - created_at FROM jobq_idempotency_keys WHERE key = 'k-window'"
    )
    assert kept == timedelta(hours=2)


async def test_an_expired_key_whose_job_is_gone_can_be_used_again(queue: Queue) -> None:
    old = await finish(queue, "k-reuse")
    await expire_key(queue.pool, "k-reuse")
    await remove_job(queue.pool, old.id)
    new = await queue.enqueue(NewJob(kind="echo", payload={"other": 1}, idempotency_key="k-reuse"))
    assert new.created and new.job.id != old.id
    again = await queue.enqueue(
        NewJob(kind="echo", payload={"other": 1}, idempotency_key="k-reuse")
    )
    assert (again.created, again.job.id) == (False, new.job.id)


async def test_an_expired_key_is_held_as_long_as_its_job_exists(queue: Queue) -> None:
    old = await finish(queue, "k-held")
    await expire_key(queue.pool, "k-held")
    again = await queue.enqueue(NewJob(kind="echo", idempotency_key="k-held"))
    assert (again.created, again.job.id) == (False, old.id)
    with pytest.raises(IdempotencyConflict):
        await queue.enqueue(NewJob(kind="echo", payload={"x": 1}, idempotency_key="k-held"))


async def test_a_key_in_its_window_whose_job_was_removed_is_refused(queue: Queue) -> None:
    old = await finish(queue, "k-gone")
    await remove_job(queue.pool, old.id)
    with pytest.raises(IdempotencyConflict, match="no longer exists") as refused:
        await queue.enqueue(NewJob(kind="echo", idempotency_key="k-gone"))
    assert refused.value.job_id == old.id


async def test_concurrent_takers_of_an_expired_key_create_one_job(queue: Queue) -> None:
    old = await finish(queue, "k-race")
    await expire_key(queue.pool, "k-race")
    await remove_job(queue.pool, old.id)
    results = await asyncio.gather(
        *(queue.enqueue(NewJob(kind="echo", idempotency_key="k-race")) for _ in range(30))
    )
    assert sum(r.created for r in results) == 1
    assert len({r.job.id for r in results}) == 1


async def test_a_bulk_enqueue_reuses_an_expired_key_whose_job_is_gone(queue: Queue) -> None:
    old = await finish(queue, "k-bulk")
    await expire_key(queue.pool, "k-bulk")
    await remove_job(queue.pool, old.id)
    stored = await queue.enqueue_all(
        [NewJob(kind="echo", idempotency_key="k-bulk"), NewJob(kind="echo")]
    )
    assert [s.created for s in stored] == [True, True] and stored[0].id != old.id
    assert (await queue.get(stored[0].id)).idempotency_key == "k-bulk"


async def test_a_bulk_enqueue_replays_a_key_whose_job_is_in_history(queue: Queue) -> None:
    old = await finish(queue, "k-bulk-done")
    stored = await queue.enqueue_all(
        [NewJob(kind="echo"), NewJob(kind="echo", idempotency_key="k-bulk-done")]
    )
    assert stored[1] == BulkEnqueued(old.id, False) and stored[0].created


async def test_a_key_of_a_job_version_3_inserted_in_jobs_is_held(deploying: Queue) -> None:
    queue = deploying
    # Version 3 writes the key on the job row only; the insert trigger remembers it.
    v3 = NewJob(kind="echo", idempotency_key="k-v3")
    job_id = await queue.pool.fetchval(
        "INSERT INTO jobs (kind, idempotency_key, request_fingerprint) VALUES ('echo', $1, $2)"
        " RETURNING id",
        "k-v3",
        fingerprint(v3),
    )
    again = await queue.enqueue(v3)
    assert (again.created, again.job.id) == (False, job_id)


# -- bounded results ----------------------------------------------------------------------


async def test_a_result_larger_than_the_bound_is_refused_and_its_job_left_leased(
    queue: Queue,
) -> None:
    bounded = Queue(queue.pool, max_result_bytes=100)
    small, large = await claimed(bounded, 2)
    done = await bounded.complete_many(
        [(lease_of(small), '"fits"'), (lease_of(large), '"' + "é" * 50 + '"')]
    )
    assert done.held == {small.id}
    reason = done.refused[large.id]
    assert "102 bytes" in reason and "JOBQ_MAX_PAYLOAD_BYTES" in reason
    assert await where_is(queue.pool, large.id) == [("jobs", "running")]
    with pytest.raises(InvalidJob, match="more than the bound of 100"):
        await bounded.complete(lease_of(large), "x" * 200)


# -- ids ----------------------------------------------------------------------------------


async def test_jobs_enqueued_one_after_another_have_ids_in_creation_order(queue: Queue) -> None:
    jobs = [(await queue.enqueue(NewJob(kind="echo"))).job for _ in range(30)]
    jobs += [
        (await queue.enqueue(NewJob(kind="echo", idempotency_key=f"k-order-{i}"))).job
        for i in range(10)
    ]
    ids = [j.id for j in jobs]
    assert ids == sorted(ids) and {i.version for i in ids} == {7}
    for job in jobs:
        assert abs(finished_not_before(job.id) + timedelta(minutes=1) - job.created_at) < timedelta(
            seconds=1
        )
