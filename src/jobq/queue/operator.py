"""Operator actions on one job: cancel and retry."""

from __future__ import annotations

import uuid

from jobq.queue.lookup import _GET, Lookup
from jobq.queue.model import (
    _JOB_COLUMNS,
    CANCEL_CHANNEL,
    NEW_JOB_CHANNEL,
    TERMINAL_STATUSES,
    CancelOutcome,
    CancelResult,
    InvalidTransition,
    Job,
    JobNotFound,
)

_RETRY = f"""
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
RETURNING {_JOB_COLUMNS}, pg_notify('{NEW_JOB_CHANNEL}', queue)::text AS _notified
"""


class Operator(Lookup):
    # -- operators ---------------------------------------------------------------------

    async def request_cancel(self, job_id: uuid.UUID) -> CancelResult:
        """Cancel a waiting job now, or ask the worker running it to stop."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(f"{_GET} FOR UPDATE", job_id)
            if row is None:
                raise JobNotFound(job_id)
            status = row["status"]
            if status in TERMINAL_STATUSES:
                return CancelResult(CancelOutcome.ALREADY_TERMINAL, Job.from_record(row))
            if status == "running":
                row = await conn.fetchrow(
                    f"UPDATE jobs SET cancel_requested = true, updated_at = now()"
                    f" WHERE id = $1 RETURNING {_JOB_COLUMNS}",
                    job_id,
                )
                await conn.execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, str(job_id))
                assert row is not None
                return CancelResult(CancelOutcome.PENDING, Job.from_record(row))
            row = await conn.fetchrow(
                f"UPDATE jobs SET status = 'cancelled', cancel_requested = true,"
                f" finished_at = now(), updated_at = now()"
                f" WHERE id = $1 RETURNING {_JOB_COLUMNS}",
                job_id,
            )
            assert row is not None
            return CancelResult(CancelOutcome.CANCELLED, Job.from_record(row))

    async def retry(self, job_id: uuid.UUID) -> Job:
        """Queue a failed_permanent or cancelled job again: attempts reset, errors kept."""
        row = await self.pool.fetchrow(_RETRY, job_id)
        if row is not None:
            return Job.from_record(row)
        job = await self.get(job_id)
        raise InvalidTransition(job_id, job.status, "retry")
