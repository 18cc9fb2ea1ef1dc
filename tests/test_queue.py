"""The queue core's contract, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import orjson
import pytest

from jobq.backoff import Backoff
from jobq.queue import (
    MAX_ERROR_HISTORY,
    MAX_ERROR_LENGTH,
    CancelOutcome,
    IdempotencyConflict,
    InvalidJob,
    InvalidTransition,
    JobNotFound,
    NewJob,
    Queue,
    lease_of,
)
from jobq.queue.leases import _CLAIM as CLAIM  # the statement itself, for its plan
from tests.helpers import NO_JOBS

KINDS = ["echo", "other"]
QUEUES = ["default"]


async def claim_one(queue: Queue, worker: str = "w1", lease: float = 30.0):  # type: ignore[no-untyped-def]
    jobs = await queue.claim(worker, KINDS, QUEUES, 1, lease_seconds=lease)
    assert len(jobs) == 1
    return jobs[0]


# -- enqueue ---------------------------------------------------------------------------


async def test_enqueue_fills_defaults(queue: Queue) -> None:
    result = await queue.enqueue(NewJob(kind="echo"))
    job = result.job
    assert result.created
    assert job.id.version == 7
    assert (job.status, job.queue, job.priority, job.attempts) == ("queued", "default", 0, 0)
    assert job.max_attempts is None  # the claiming worker's handler decides
    assert job.payload == {}
    assert job.errors == []
    assert job.run_at <= datetime.now(UTC)


async def test_same_idempotency_key_and_request_returns_existing_job(queue: Queue) -> None:
    first = await queue.enqueue(NewJob(kind="echo", payload={"a": 1}, idempotency_key="k1"))
    second = await queue.enqueue(NewJob(kind="echo", payload={"a": 1}, idempotency_key="k1"))
    assert first.created and not second.created
    assert second.job.id == first.job.id


@pytest.mark.parametrize(
    "changed",
    [
        NewJob(kind="other", payload={"a": 1}, idempotency_key="k"),
        NewJob(kind="echo", payload={"a": 2}, idempotency_key="k"),
        NewJob(kind="echo", payload={"a": 1}, queue="q2", idempotency_key="k"),
        NewJob(kind="echo", payload={"a": 1}, priority=5, idempotency_key="k"),
        NewJob(kind="echo", payload={"a": 1}, max_attempts=9, idempotency_key="k"),
    ],
)
async def test_idempotency_key_reused_with_another_request_is_rejected(
    queue: Queue, changed: NewJob
) -> None:
    await queue.enqueue(NewJob(kind="echo", payload={"a": 1}, idempotency_key="k"))
    with pytest.raises(IdempotencyConflict):
        await queue.enqueue(changed)
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 1


async def test_fifty_concurrent_enqueues_with_one_key_create_one_job(queue: Queue) -> None:
    results = await asyncio.gather(
        *(queue.enqueue(NewJob(kind="echo", idempotency_key="race")) for _ in range(50))
    )
    assert sum(r.created for r in results) == 1
    assert len({r.job.id for r in results}) == 1
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 1


async def test_enqueue_notifies_workers(queue: Queue, dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    got: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener("jobq_jobs", lambda *a: got.put_nowait(a[3]))
    try:
        await queue.enqueue(NewJob(kind="echo", queue="mail"))
        assert await asyncio.wait_for(got.get(), 5) == "mail"
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("job", "field"),
    [
        (NewJob(kind=""), "kind"),
        (NewJob(kind="x" * 256), "kind"),
        (NewJob(kind="bad\nkind"), "kind"),
        (NewJob(kind="echo", queue=""), "queue"),
        (NewJob(kind="echo", payload={"s": "nul\x00"}), "payload"),
        (NewJob(kind="echo", payload={"s": "\ud800"}), "payload"),
        (NewJob(kind="echo", max_attempts=0), "max_attempts"),
        (NewJob(kind="echo", max_attempts=1001), "max_attempts"),
        (NewJob(kind="echo", priority=40000), "priority"),
        (NewJob(kind="echo", idempotency_key="k" * 256), "idempotency_key"),
        (NewJob(kind="echo", idempotency_key="caf\u00e9"), "idempotency_key"),
        (NewJob(kind="echo", concurrency_key="a\ud800b"), "concurrency_key"),
        (NewJob(kind="echo", queue=".."), "queue"),
        (NewJob(kind="."), "kind"),
    ],
)
async def test_invalid_jobs_are_rejected_and_nothing_is_stored(
    queue: Queue, job: NewJob, field: str
) -> None:
    with pytest.raises(InvalidJob) as info:
        await queue.enqueue(job)
    assert info.value.field == field
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 0


async def test_enqueue_many_inserts_all_in_order(queue: Queue) -> None:
    ids = await queue.enqueue_many([NewJob(kind="echo", payload={"i": i}) for i in range(100)])
    assert len(set(ids)) == 100
    rows = await queue.pool.fetch("SELECT id, payload FROM jobs")
    by_id = {r["id"]: r["payload"]["i"] for r in rows}
    assert [by_id[i] for i in ids] == list(range(100))


async def test_ids_of_a_bulk_enqueue_sort_in_input_order(queue: Queue) -> None:
    # Lists are newest first by id: a batch (all within a millisecond or two) must keep its
    # order there, keyed and unkeyed items alike.
    jobs = [
        NewJob(kind="echo", payload={"i": i}, idempotency_key=f"k{999 - i}" if i % 3 else None)
        for i in range(1000)
    ]
    ids = await queue.enqueue_many(jobs)
    assert ids == sorted(ids)


async def test_enqueue_many_honours_idempotency_keys(queue: Queue) -> None:
    existing = await queue.enqueue(NewJob(kind="echo", idempotency_key="a"))
    ids = await queue.enqueue_many(
        [
            NewJob(kind="echo", idempotency_key="a"),
            NewJob(kind="echo", idempotency_key="b"),
            NewJob(kind="echo", idempotency_key="b"),
            NewJob(kind="echo"),
        ]
    )
    assert ids[0] == existing.job.id
    assert ids[1] == ids[2]
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 3


async def test_enqueue_many_with_a_conflicting_key_stores_nothing(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo", idempotency_key="a"))
    with pytest.raises(IdempotencyConflict):
        await queue.enqueue_many(
            [NewJob(kind="echo"), NewJob(kind="echo", payload={"x": 1}, idempotency_key="a")]
        )
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 1


# -- get and list ----------------------------------------------------------------------


async def test_get_unknown_job_raises_not_found(queue: Queue) -> None:
    with pytest.raises(JobNotFound):
        await queue.get(uuid.uuid4())


async def test_list_is_newest_first(queue: Queue) -> None:
    ids = [(await queue.enqueue(NewJob(kind="echo"))).job.id for _ in range(5)]
    page = await queue.list_jobs()
    assert [j.id for j in page.jobs] == ids[::-1]


async def test_list_filters_by_status_kind_and_queue(queue: Queue) -> None:
    a = (await queue.enqueue(NewJob(kind="echo", queue="q1"))).job
    b = (await queue.enqueue(NewJob(kind="other", queue="q1"))).job
    c = (await queue.enqueue(NewJob(kind="echo", queue="q2"))).job
    await queue.request_cancel(c.id)
    assert {j.id for j in (await queue.list_jobs(kind="echo")).jobs} == {a.id, c.id}
    assert {j.id for j in (await queue.list_jobs(queue="q1")).jobs} == {a.id, b.id}
    assert {j.id for j in (await queue.list_jobs(status="cancelled")).jobs} == {c.id}
    assert {j.id for j in (await queue.list_jobs(status="queued", kind="echo")).jobs} == {a.id}


@pytest.mark.parametrize(("asked", "got"), [(None, 50), (0, 1), (-5, 1), (7, 7), (500, 200)])
async def test_list_limit_is_clamped(queue: Queue, asked: int | None, got: int) -> None:
    await queue.enqueue_many([NewJob(kind="echo") for _ in range(230)])
    assert len((await queue.list_jobs(limit=asked)).jobs) == got


async def test_list_offset_skips_newest(queue: Queue) -> None:
    ids = [(await queue.enqueue(NewJob(kind="echo"))).job.id for _ in range(4)]
    page = await queue.list_jobs(limit=2, offset=1)
    assert [j.id for j in page.jobs] == [ids[2], ids[1]]


async def test_list_rejects_negative_offset_and_unknown_status(queue: Queue) -> None:
    with pytest.raises(InvalidJob):
        await queue.list_jobs(offset=-1)
    with pytest.raises(InvalidJob):
        await queue.list_jobs(status="done")


async def test_cursor_pages_have_no_duplicates_when_newer_jobs_arrive(queue: Queue) -> None:
    await queue.enqueue_many([NewJob(kind="echo", payload={"i": i}) for i in range(25)])
    first = await queue.list_jobs(limit=10)
    await queue.enqueue_many([NewJob(kind="echo") for _ in range(5)])  # newer ones
    seen = [j.id for j in first.jobs]
    cursor = first.next_cursor
    while cursor:
        page = await queue.list_jobs(limit=10, cursor=cursor)
        seen += [j.id for j in page.jobs]
        cursor = page.next_cursor
    assert len(seen) == len(set(seen)) == 25


# -- cancel ----------------------------------------------------------------------------


async def test_cancel_queued_job_cancels_it_now(queue: Queue) -> None:
    job = (await queue.enqueue(NewJob(kind="echo"))).job
    result = await queue.request_cancel(job.id)
    assert result.outcome is CancelOutcome.CANCELLED
    assert result.job.status == "cancelled"
    assert result.job.finished_at is not None
    assert await queue.claim("w", KINDS, QUEUES, 10, lease_seconds=30) == []


async def test_cancel_retrying_job_cancels_it_now(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    job = await claim_one(queue)
    assert await queue.fail(job, "boom") == "retrying"
    result = await queue.request_cancel(job.id)
    assert result.outcome is CancelOutcome.CANCELLED


async def test_cancel_running_job_is_pending_and_notifies(queue: Queue, dsn: str) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    job = await claim_one(queue)
    conn = await asyncpg.connect(dsn)
    got: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener("jobq_cancel", lambda *a: got.put_nowait(a[3]))
    try:
        result = await queue.request_cancel(job.id)
        assert result.outcome is CancelOutcome.PENDING
        assert result.job.status == "running" and result.job.cancel_requested
        assert await asyncio.wait_for(got.get(), 5) == str(job.id)
    finally:
        await conn.close()


async def test_cancel_terminal_job_reports_its_state(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    job = await claim_one(queue)
    assert await queue.complete(lease_of(job), {"ok": True})
    result = await queue.request_cancel(job.id)
    assert result.outcome is CancelOutcome.ALREADY_TERMINAL
    assert result.job.status == "succeeded"


async def test_cancel_unknown_job_raises_not_found(queue: Queue) -> None:
    with pytest.raises(JobNotFound):
        await queue.request_cancel(uuid.uuid4())


# -- claim -----------------------------------------------------------------------------


async def test_claim_leases_and_counts_the_attempt(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    job = await claim_one(queue, lease=30)
    assert job.status == "running"
    assert job.attempts == 1
    assert job.lease_owner == "w1" and job.lease_token is not None
    assert job.started_at is not None and job.lease_expires_at is not None
    assert job.lease_expires_at - job.started_at == timedelta(seconds=30)


async def test_claim_orders_by_priority_then_due_time(queue: Queue) -> None:
    now = datetime.now(UTC)
    late = (await queue.enqueue(NewJob(kind="echo", run_at=now - timedelta(seconds=1)))).job
    early = (await queue.enqueue(NewJob(kind="echo", run_at=now - timedelta(seconds=9)))).job
    urgent = (await queue.enqueue(NewJob(kind="echo", priority=-1))).job
    claimed = await queue.claim("w", KINDS, QUEUES, 10, lease_seconds=30)
    assert [j.id for j in claimed] == [urgent.id, early.id, late.id]


async def test_claim_skips_jobs_not_yet_due(queue: Queue) -> None:
    future = datetime.now(UTC) + timedelta(hours=1)
    await queue.enqueue(NewJob(kind="echo", run_at=future))
    assert await queue.claim("w", KINDS, QUEUES, 10, lease_seconds=30) == []


async def test_claim_takes_only_kinds_and_queues_the_worker_handles(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="unhandled"))
    await queue.enqueue(NewJob(kind="echo", queue="elsewhere"))
    mine = (await queue.enqueue(NewJob(kind="echo"))).job
    claimed = await queue.claim("w", ["echo"], ["default"], 10, lease_seconds=30)
    assert [j.id for j in claimed] == [mine.id]
    statuses = await queue.pool.fetch("SELECT kind, queue, status FROM jobs ORDER BY kind")
    assert [r["status"] for r in statuses if r["kind"] == "unhandled"] == ["queued"]


async def test_concurrent_claims_never_share_a_job(queue: Queue) -> None:
    await queue.enqueue_many([NewJob(kind="echo") for _ in range(200)])
    batches = await asyncio.gather(
        *(queue.claim(f"w{i}", KINDS, QUEUES, 30, lease_seconds=30) for i in range(10))
    )
    ids = [j.id for batch in batches for j in batch]
    assert len(ids) == len(set(ids)) == 200


# -- complete and fail -----------------------------------------------------------------


async def test_complete_stores_result_and_finishes(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    job = await claim_one(queue)
    assert await queue.complete(lease_of(job), {"answer": 42})
    done = await queue.get(job.id)
    assert done.status == "succeeded"
    assert done.result == {"answer": 42}
    assert done.finished_at is not None and done.lease_token is None


async def test_fail_with_attempts_left_schedules_a_retry_within_backoff(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo", max_attempts=3))
    job = await claim_one(queue)
    before = datetime.now(UTC)
    assert await queue.fail(job, "boom", backoff=Backoff(10, 20)) == "retrying"
    after = datetime.now(UTC)
    row = await queue.get(job.id)
    assert row.last_error == "boom"
    assert row.errors[0]["attempt"] == 1 and row.errors[0]["error"] == "boom"
    assert row.retry_delay_seconds is not None and 10 <= row.retry_delay_seconds <= 20
    assert before + timedelta(seconds=10) <= row.run_at <= after + timedelta(seconds=20)


async def test_fail_on_last_attempt_is_permanent(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo", max_attempts=2))
    for attempt in (1, 2):
        await queue.pool.execute("UPDATE jobs SET run_at = now()")
        job = await claim_one(queue)
        assert job.attempts == attempt
        status = await queue.fail(job, f"boom {attempt}", backoff=Backoff(0.001, 0.001))
    assert status == "failed_permanent"
    row = await queue.get(job.id)
    assert [e["error"] for e in row.errors] == ["boom 1", "boom 2"]
    assert row.finished_at is not None


async def test_permanent_fail_ignores_attempts_left(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo", max_attempts=5))
    job = await claim_one(queue)
    assert await queue.fail(job, "bad payload", permanent=True) == "failed_permanent"


async def test_writes_from_a_lost_lease_change_nothing(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    stale = await claim_one(queue, worker="paused", lease=0.01)
    await asyncio.sleep(0.05)
    assert [r.job_id for r in await queue.rescue()] == [stale.id]
    await queue.pool.execute("UPDATE jobs SET run_at = now()")  # its retry delay has passed
    fresh = await claim_one(queue, worker="healthy")
    assert not await queue.complete(lease_of(stale), {"late": True})
    assert await queue.fail(stale, "late failure") is None
    assert not await queue.mark_cancelled(lease_of(stale))
    assert await queue.complete(lease_of(fresh), {"on_time": True})
    row = await queue.get(stale.id)
    assert row.status == "succeeded" and row.result == {"on_time": True}


async def test_a_worker_cannot_complete_a_job_cancelled_meanwhile(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    job = await claim_one(queue, lease=0.01)
    await asyncio.sleep(0.05)
    await queue.request_cancel(job.id)
    await queue.rescue()
    assert not await queue.complete(lease_of(job))
    assert (await queue.get(job.id)).status == "cancelled"


# -- heartbeat, rescue, release --------------------------------------------------------


async def test_heartbeat_extends_leases_and_reports_cancel_requests(queue: Queue) -> None:
    await queue.enqueue_many([NewJob(kind="echo") for _ in range(2)])
    a, b = await queue.claim("w", KINDS, QUEUES, 2, lease_seconds=1)
    await queue.request_cancel(b.id)
    result = await queue.heartbeat([lease_of(a), lease_of(b)], lease_seconds=60)
    assert result.cancel_requested == {lease_of(b)}
    assert result.lost == set()
    row = await queue.get(a.id)
    assert row.lease_expires_at is not None
    assert row.lease_expires_at > datetime.now(UTC) + timedelta(seconds=50)


async def test_heartbeat_reports_leases_lost(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    job = await claim_one(queue, lease=0.01)
    await asyncio.sleep(0.05)
    await queue.rescue()
    result = await queue.heartbeat([lease_of(job)], lease_seconds=60)
    assert result.lost == {lease_of(job)}


async def test_a_heartbeat_skips_a_row_locked_by_someone_else_and_still_extends_the_rest(
    queue: Queue,
) -> None:
    await queue.enqueue_many([NewJob(kind="echo") for _ in range(2)])
    a, b = await queue.claim("w", KINDS, QUEUES, 2, lease_seconds=1)
    async with queue.pool.acquire() as operator, operator.transaction():
        await operator.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", b.id)
        result = await asyncio.wait_for(
            queue.heartbeat([lease_of(a), lease_of(b)], lease_seconds=60), timeout=5
        )
    assert result.lost == set()
    assert result.skipped == {lease_of(b)}
    row = await queue.get(a.id)
    assert row.lease_expires_at is not None
    assert row.lease_expires_at > datetime.now(UTC) + timedelta(seconds=50)


async def test_a_heartbeat_extends_the_lease_from_the_time_of_the_write(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    job = await claim_one(queue)
    async with queue.pool.acquire() as conn, conn.transaction():
        # now() is frozen at the start of the transaction; the write happens a second later.
        await conn.execute("SELECT pg_sleep(1.0)")
        await queue.heartbeat([lease_of(job)], lease_seconds=0.5, conn=conn)
        expires, written = await conn.fetchrow(
            "SELECT lease_expires_at, clock_timestamp() FROM jobs WHERE id = $1", job.id
        )
    assert expires > written


async def test_rescue_returns_expired_runs_to_the_queue(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    job = await claim_one(queue, lease=0.01)
    await asyncio.sleep(0.05)
    rescued = await queue.rescue()
    assert [(r.job_id, r.status) for r in rescued] == [(job.id, "retrying")]
    row = await queue.get(job.id)
    assert row.status == "retrying" and row.lease_token is None
    assert "worker lost" in (row.last_error or "")
    assert await queue.rescue() == []  # idempotent


async def test_rescue_fails_permanently_when_attempts_are_spent(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo", max_attempts=1))
    await claim_one(queue, lease=0.01)
    await asyncio.sleep(0.05)
    assert [r.status for r in await queue.rescue()] == ["failed_permanent"]


async def test_rescue_leaves_live_leases_alone(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    await claim_one(queue, lease=60)
    assert await queue.rescue() == []


async def test_release_returns_jobs_without_counting_the_attempt(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    job = await claim_one(queue)
    assert await queue.release([lease_of(job)]) == [job.id]
    row = await queue.get(job.id)
    assert (row.status, row.attempts) == ("queued", 0)
    again = await claim_one(queue)
    assert again.id == job.id and again.attempts == 1


# -- retry -----------------------------------------------------------------------------


async def test_retry_requeues_a_failed_job_and_keeps_its_errors(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo", max_attempts=1))
    job = await claim_one(queue)
    await queue.fail(job, "boom")
    again = await queue.retry(job.id)
    assert (again.status, again.attempts) == ("queued", 0)
    assert [e["error"] for e in again.errors] == ["boom"]


async def test_retry_of_a_live_job_is_an_invalid_transition(queue: Queue) -> None:
    job = (await queue.enqueue(NewJob(kind="echo"))).job
    with pytest.raises(InvalidTransition):
        await queue.retry(job.id)


# -- outcomes after a cancel request ---------------------------------------------------


async def test_a_cancel_requested_after_the_handler_returned_leaves_the_job_succeeded(
    queue: Queue,
) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    job = await claim_one(queue)
    # The handler has returned; its completion is not written yet when the cancel arrives.
    assert (await queue.request_cancel(job.id)).outcome is CancelOutcome.PENDING
    assert await queue.complete(lease_of(job), {"done": True})
    row = await queue.get(job.id)
    assert (row.status, row.result, row.cancel_requested) == ("succeeded", {"done": True}, True)


async def test_a_failed_attempt_after_a_cancel_request_ends_cancelled_not_retrying(
    queue: Queue,
) -> None:
    await queue.enqueue(NewJob(kind="echo", max_attempts=3))
    job = await claim_one(queue)
    await queue.request_cancel(job.id)
    assert await queue.fail(job, "boom") == "cancelled"
    row = await queue.get(job.id)
    assert (row.status, row.last_error, row.finished_at is not None) == ("cancelled", "boom", True)


async def test_a_released_job_keeps_no_lease_owner(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    job = await claim_one(queue, worker="stopping")
    await queue.release([lease_of(job)])
    row = await queue.get(job.id)
    assert (row.status, row.lease_owner, row.lease_token) == ("queued", None, None)


# -- rescue schedules the retry with the job's backoff ----------------------------------


async def _expire_leases(queue: Queue) -> None:
    await queue.pool.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE status = 'running'"
    )


async def test_a_rescued_job_is_retried_after_its_kinds_backoff_not_at_once(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo", max_attempts=3))
    job = await claim_one(queue)
    await _expire_leases(queue)
    before = datetime.now(UTC)
    rescued = await queue.rescue(backoffs={"echo": Backoff(10, 20)})
    after = datetime.now(UTC)
    assert [(r.job_id, r.status) for r in rescued] == [(job.id, "retrying")]
    row = await queue.get(job.id)
    assert row.retry_delay_seconds is not None and 10 <= row.retry_delay_seconds <= 20
    assert before + timedelta(seconds=10) <= row.run_at <= after + timedelta(seconds=20)


async def test_a_rescued_job_of_another_kind_is_retried_after_the_default_backoff(
    pool: asyncpg.Pool,
) -> None:
    await pool.execute(NO_JOBS)
    queue = Queue(pool, default_backoff=Backoff(30, 30))
    await queue.enqueue(NewJob(kind="other", max_attempts=3))
    job = await claim_one(queue)
    await _expire_leases(queue)
    before = datetime.now(UTC)
    await queue.rescue(backoffs={"echo": Backoff(1, 1)})
    row = await queue.get(job.id)
    assert row.retry_delay_seconds == 30
    assert row.run_at >= before + timedelta(seconds=30)


async def test_a_rescue_draws_the_next_delay_from_the_previous_one(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo", max_attempts=3))
    await queue.pool.execute("UPDATE jobs SET retry_delay_seconds = 100")
    await claim_one(queue)
    await _expire_leases(queue)
    await queue.rescue(backoffs={"echo": Backoff(1, 1000)})
    row = (await queue.list_jobs()).jobs[0]
    assert row.retry_delay_seconds is not None and 1 <= row.retry_delay_seconds <= 300


# -- idempotency fingerprint -------------------------------------------------------------


async def test_the_same_instant_with_another_utc_offset_is_the_same_idempotent_request(
    queue: Queue,
) -> None:
    at_utc = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    at_paris = at_utc.astimezone(timezone(timedelta(hours=1)))
    first = await queue.enqueue(NewJob(kind="echo", run_at=at_utc, idempotency_key="k"))
    again = await queue.enqueue(NewJob(kind="echo", run_at=at_paris, idempotency_key="k"))
    assert (again.created, again.job.id) == (False, first.job.id)


# -- error history and what a claim hands over ----------------------------------------------


async def test_the_error_history_keeps_only_the_latest_entries(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo", max_attempts=1000))
    for _ in range(MAX_ERROR_HISTORY + 5):
        await queue.pool.execute("UPDATE jobs SET run_at = now()")
        job = await claim_one(queue)
        await queue.fail(job, f"boom {job.attempts}", backoff=Backoff(0.001, 0.001))
    row = await queue.get(job.id)
    assert [e["attempt"] for e in row.errors] == list(range(6, MAX_ERROR_HISTORY + 6))
    assert row.last_error == f"boom {MAX_ERROR_HISTORY + 5}"


async def test_each_error_entry_and_last_error_are_capped(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo", max_attempts=1))
    job = await claim_one(queue)
    await queue.fail(job, "x" * (MAX_ERROR_LENGTH * 3))
    row = await queue.get(job.id)
    assert len(row.errors[0]["error"]) == len(row.last_error or "") == MAX_ERROR_LENGTH
    assert (row.last_error or "").endswith("…")


async def test_a_rescue_keeps_the_error_history_capped(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo", max_attempts=1000))
    history = [{"attempt": i, "error": "old", "at": "2030-01-01T00:00:00Z"} for i in range(20)]
    await queue.pool.execute(
        "UPDATE jobs SET errors = $1::text::jsonb", orjson.dumps(history).decode()
    )
    job = await claim_one(queue)
    await queue.pool.execute("UPDATE jobs SET lease_expires_at = now() - interval '1 second'")
    await queue.rescue()
    row = await queue.get(job.id)
    assert len(row.errors) == MAX_ERROR_HISTORY
    assert "worker lost" in row.errors[-1]["error"]


async def test_a_claim_does_not_hand_the_worker_the_error_history_or_the_result(
    queue: Queue,
) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    big = [{"attempt": i, "error": "e" * 1000, "at": "2030-01-01T00:00:00Z"} for i in range(20)]
    await queue.pool.execute(
        "UPDATE jobs SET errors = $1::text::jsonb, last_error = 'e', result = '{\"old\": 1}'",
        orjson.dumps(big).decode(),
    )
    job = await claim_one(queue)
    assert (job.errors, job.last_error, job.result) == ([], None, None)
    assert len((await queue.get(job.id)).errors) == 20  # still stored


# -- max_attempts not specified: the handler's, at run time -------------------------------


async def test_a_job_enqueued_without_max_attempts_takes_the_handlers_value_when_claimed(
    queue: Queue,
) -> None:
    await queue.enqueue(NewJob(kind="echo"))
    (job,) = await queue.claim("w", KINDS, QUEUES, 1, lease_seconds=30, max_attempts={"echo": 7})
    assert job.max_attempts == 7
    assert (await queue.get(job.id)).max_attempts == 7


async def test_a_job_without_max_attempts_whose_handler_sets_none_gets_the_default(
    pool: asyncpg.Pool,
) -> None:
    await pool.execute(NO_JOBS)
    queue = Queue(pool, default_max_attempts=5)
    await queue.enqueue(NewJob(kind="other"))
    (job,) = await queue.claim("w", KINDS, QUEUES, 1, lease_seconds=30, max_attempts={"echo": 7})
    assert job.max_attempts == 5


async def test_a_max_attempts_given_at_enqueue_wins_over_the_handlers(queue: Queue) -> None:
    await queue.enqueue(NewJob(kind="echo", max_attempts=2))
    (job,) = await queue.claim("w", KINDS, QUEUES, 1, lease_seconds=30, max_attempts={"echo": 7})
    assert job.max_attempts == 2


# -- claims bounded by queue and due time ---------------------------------------------------


async def test_a_claim_over_two_queues_takes_the_lowest_priority_first_across_both(
    queue: Queue,
) -> None:
    now = datetime.now(UTC)
    a_late = (await queue.enqueue(NewJob(kind="echo", queue="a", run_at=now))).job
    b_urgent = (await queue.enqueue(NewJob(kind="echo", queue="b", priority=-5))).job
    a_early = (
        await queue.enqueue(NewJob(kind="echo", queue="a", run_at=now - timedelta(seconds=5)))
    ).job
    b_low = (await queue.enqueue(NewJob(kind="echo", queue="b", priority=3))).job
    claimed = await queue.claim("w", KINDS, ["a", "b"], 10, lease_seconds=30)
    assert [j.id for j in claimed] == [b_urgent.id, a_early.id, a_late.id, b_low.id]


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in _plan_nodes(child))]


async def _explain_claim(queue: Queue, n: int) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of a claim of n from QUEUES, rolled back (ANALYZE runs it)."""
    async with queue.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            plan_json = await conn.fetchval(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + CLAIM,
                "w", KINDS, QUEUES, n, 30.0, [], [], 3,
            )  # fmt: skip
        finally:
            await tx.rollback()
    plan = orjson.loads(plan_json) if isinstance(plan_json, str | bytes) else plan_json
    return dict(plan[0])


async def test_a_claim_reads_neither_other_queues_backlogs_nor_jobs_not_yet_due(
    queue: Queue,
) -> None:
    load = (
        "INSERT INTO jobs (kind, queue, run_at)"
        " SELECT 'echo', $1, now() + make_interval(secs => $3) FROM generate_series(1, $2)"
    )
    await queue.pool.execute(load, "bulk", 20_000, -60.0)  # due, another queue
    await queue.pool.execute(load, "default", 20_000, 86_400.0)  # this queue, due tomorrow
    await queue.pool.execute(load, "default", 1, -1.0)
    await queue.pool.execute("ANALYZE jobs")
    plan = await _explain_claim(queue, 10)
    nodes = _plan_nodes(plan["Plan"])
    assert plan["Plan"]["Actual Rows"] == 1
    assert sum(n.get("Rows Removed by Filter", 0) for n in nodes) == 0
    assert plan["Plan"]["Shared Hit Blocks"] + plan["Plan"]["Shared Read Blocks"] < 200


async def test_a_claim_locks_about_the_rows_it_takes_however_many_priorities_wait(
    queue: Queue,
) -> None:
    await queue.pool.execute(
        "INSERT INTO jobs (kind, priority, run_at)"
        " SELECT 'echo', g % 100, now() - interval '1 minute' FROM generate_series(1, 2000) AS g"
    )
    await queue.pool.execute("ANALYZE jobs")
    plan = await _explain_claim(queue, 10)
    locked = sum(
        n["Actual Rows"] * n["Actual Loops"]
        for n in _plan_nodes(plan["Plan"])
        if n["Node Type"] == "LockRows"
    )
    assert plan["Plan"]["Actual Rows"] == 10
    assert locked <= 2 * 10  # not 10 for each of the 100 priorities
