"""Operator actions on one job: cancel and retry."""

from __future__ import annotations

import uuid

from jobq.queue.leases import with_history_leaves
from jobq.queue.lookup import Lookup, finished_not_before
from jobq.queue.model import (
    _HISTORY_AS_JOB,
    _JOB_COLUMNS,
    CANCEL_CHANNEL,
    NEW_JOB_CHANNEL,
    TERMINAL_STATUSES,
    CancelOutcome,
    CancelResult,
    InvalidTransition,
    Job,
    JobNotFound,
    NewJob,
    into_history,
    notify_watchers,
)
from jobq.queue.unique import _HOLDER_LOCKED, UniqueSpec, binding_status, unique_key

_LOCK_LIVE = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE"

_ASK_TO_CANCEL = f"""
UPDATE jobs SET cancel_requested = true, updated_at = now() WHERE id = $1
RETURNING {_JOB_COLUMNS}
"""

# A waiting job cancelled ends at once: it moves to history.
_CANCEL_WAITING = f"""
WITH ended AS (
    DELETE FROM jobs WHERE id = $1 AND status IN ('queued', 'retrying')
    RETURNING *, {notify_watchers("jobs")}
)
{into_history("ended", status="'cancelled'", cancel_requested="true", finished_at="now()")}
RETURNING {_HISTORY_AS_JOB}
"""

# Back from history to the live table in one statement: of two concurrent retries, one
# deletes the row and the other finds nothing to delete. A finished row that version 3 left
# in `jobs` is queued again in place.
_RETRIED = """'queued' AS status, 0 AS attempts, false AS cancel_requested, now() AS run_at,
           NULL::jsonb AS result, NULL::timestamptz AS started_at,
           NULL::timestamptz AS finished_at, NULL::text AS lease_owner, now() AS updated_at"""
_RETRY = f"""
WITH moved AS (
    DELETE FROM jobs_history
    WHERE id = $1 AND finished_at >= $2 AND status IN ('failed_permanent', 'cancelled')
    RETURNING *
), requeued AS (
    -- Its concurrency key comes back with it: a retried job runs under the same limits.
    INSERT INTO jobs (id, kind, queue, payload, priority, max_attempts, idempotency_key,
                      concurrency_key, trace_context, last_error, errors, created_at, status,
                      attempts, cancel_requested, run_at, result, started_at, finished_at,
                      lease_owner, updated_at)
    SELECT id, kind, queue, payload, priority, max_attempts, idempotency_key,
           concurrency_key, trace_context, last_error, errors, created_at, {_RETRIED}
    FROM moved
    RETURNING {_JOB_COLUMNS}
), in_place AS (
    UPDATE jobs
    SET status = 'queued',
        attempts = 0,
        cancel_requested = false,
        run_at = now(),
        retry_delay_seconds = NULL,
        result = NULL,
        started_at = NULL,
        finished_at = NULL,
        lease_owner = NULL,
        updated_at = now()
    WHERE id = $1 AND status IN ('failed_permanent', 'cancelled')
    RETURNING {_JOB_COLUMNS}
)
SELECT r.*, pg_notify('{NEW_JOB_CHANNEL}', r.queue)::text AS _notified
FROM (SELECT * FROM requeued UNION ALL SELECT * FROM in_place) AS r
"""


# A unique job retried takes its key back (the key row locked first, as a take-over does):
# from then on, enqueues of the key find it as their duplicate.
_RETAKE_KEY = """
INSERT INTO jobq_unique_keys (key, job_id, expires_at) VALUES ($1, $2, now() + $3::interval)
ON CONFLICT (key) DO UPDATE
    SET job_id = excluded.job_id, created_at = now(), expires_at = excluded.expires_at
"""


class UniqueHeld(InvalidTransition):
    """A retry of a unique job whose key another job holds, in a state that counts."""

    def __init__(self, job: Job, holder: uuid.UUID, holder_status: str) -> None:
        super().__init__(job.id, job.status, "retry")
        self.args = (
            f"job {job.id} is {job.status}; cannot retry: unique job {holder} "
            f"({holder_status}) holds its key, and retrying would duplicate it",
        )
        self.holder = holder
        self.holder_status = holder_status


class Operator(Lookup):
    # Kinds every enqueue of which is unique (Queue(unique=...)); set by Queue.
    unique_defaults: dict[str, UniqueSpec]

    # -- operators ---------------------------------------------------------------------

    async def request_cancel(self, job_id: uuid.UUID) -> CancelResult:
        """Cancel a waiting job now, or ask the worker running it to stop."""
        return await with_history_leaves(
            self.pool, self.history_leaf_width, lambda: self._request_cancel(job_id)
        )

    async def _request_cancel(self, job_id: uuid.UUID) -> CancelResult:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_LOCK_LIVE, job_id)
            if row is None:
                # Ended, or unknown: `get` reads both places in one snapshot, so a job it does
                # not find does not exist. One it finds live again was retried meanwhile.
                job = await self.get(job_id)
                if job.is_terminal:
                    return CancelResult(CancelOutcome.ALREADY_TERMINAL, job)
                row = await conn.fetchrow(_LOCK_LIVE, job_id)
                if row is None:  # pragma: no cover - retried and ended again in between
                    raise JobNotFound(job_id)
            status = row["status"]
            if status in TERMINAL_STATUSES:  # left in `jobs` by version 3
                return CancelResult(CancelOutcome.ALREADY_TERMINAL, Job.from_record(row))
            if status == "running":
                row = await conn.fetchrow(_ASK_TO_CANCEL, job_id)
                await conn.execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, str(job_id))
                assert row is not None
                return CancelResult(CancelOutcome.PENDING, Job.from_record(row))
            row = await conn.fetchrow(_CANCEL_WAITING, job_id)
            assert row is not None
            return CancelResult(CancelOutcome.CANCELLED, Job.from_record(row))

    async def retry(self, job_id: uuid.UUID) -> Job:
        """Queue a failed_permanent or cancelled job again: attempts reset, errors kept.

        A job of a kind that is unique (`Queue(unique=...)`) respects its unique states: while
        another job holds its key (enqueued within the period, in one of the states), the
        retry is refused (UniqueHeld, an InvalidTransition); else the retried job takes the key
        back, for a new period."""
        bound = finished_not_before(job_id)
        if self.unique_defaults:
            job = await self.get(job_id)
            spec = self.unique_defaults.get(job.kind)
            if spec is not None and job.idempotency_key is None:
                return await self._retry_unique(job, spec, bound)
        row = await self.pool.fetchrow(_RETRY, job_id, bound)
        if row is not None:
            return Job.from_record(row)
        job = await self.get(job_id)
        raise InvalidTransition(job_id, job.status, "retry")

    async def _retry_unique(self, job: Job, spec: UniqueSpec, bound: object) -> Job:
        key = unique_key(NewJob(kind=job.kind, payload=job.payload, queue=job.queue), spec)
        async with self.pool.acquire() as conn, conn.transaction():
            held = await conn.fetchrow(_HOLDER_LOCKED, key)
            if held is not None and held["job_id"] != job.id:
                status = await binding_status(conn, held, spec)
                if status is not None:
                    raise UniqueHeld(job, held["job_id"], status)
            row = await conn.fetchrow(_RETRY, job.id, bound)
            if row is not None:
                await conn.execute(_RETAKE_KEY, key, job.id, spec.period)
                return Job.from_record(row)
        current = await self.get(job.id)
        raise InvalidTransition(job.id, current.status, "retry")
