"""Reading jobs: one by id, and lists with filters and a cursor."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from jobq.queue.base import QueueBase
from jobq.queue.model import (
    _HISTORY_AS_JOB,
    _HISTORY_AS_SUMMARY,
    _JOB_COLUMNS,
    _SUMMARY_COLUMNS,
    MAX_OFFSET,
    STATUSES,
    TERMINAL_STATUSES,
    InvalidJob,
    Job,
    JobNotFound,
    JobSummary,
    Page,
    SummaryPage,
)
from jobq.queue.validation import clamp_limit


def encode_cursor(job: Job | JobSummary) -> str:
    return base64.urlsafe_b64encode(str(job.id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> uuid.UUID:
    """The last job id a cursor names. Only the exact text encode_cursor makes is accepted (a
    job id), or what version 3 made (a UTC creation time and a job id; the id is enough now):
    nothing else a client makes up can reach the database."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=") != cursor:
            raise ValueError("not canonical")
        if "|" not in raw:
            job_id = uuid.UUID(raw)
            if str(job_id) != raw:
                raise ValueError("not canonical")
            return job_id
        created_text, _, id_text = raw.partition("|")
        created, job_id = datetime.fromisoformat(created_text), uuid.UUID(id_text)
        canonical = f"{created.isoformat()}|{job_id}"
        if created.utcoffset() != timedelta(0) or canonical != raw:
            raise ValueError("not canonical")
        return job_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidJob("cursor", "is not a cursor returned by this API") from None


def finished_not_before(job_id: uuid.UUID) -> datetime:
    """An instant the job cannot have finished before: its creation, from the time in its
    UUIDv7 id, less a minute for clocks of other hosts. Bounds reads of history so that leaves
    older than the job are skipped. Not a version-7 id: no bound."""
    if job_id.version != 7:
        return _NO_BOUND
    created_ms = job_id.int >> 80
    try:
        return datetime.fromtimestamp(created_ms / 1000, UTC) - _CLOCK_MARGIN
    except (ValueError, OverflowError, OSError):
        # A time past the year 9999 (any client can send such an id): no bound, then.
        return _NO_BOUND


_NO_BOUND = datetime.min.replace(tzinfo=UTC)
_CLOCK_MARGIN = timedelta(minutes=1)

# A job is in exactly one of `jobs` and `jobs_history`, moved between them by single
# statements: one statement (one snapshot) sees it once, in whichever place it was.
_GET = f"""
SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1
UNION ALL
SELECT {_HISTORY_AS_JOB} FROM jobs_history WHERE id = $1 AND finished_at >= $2
LIMIT 1
"""

# Version 3 ended jobs in place: finished rows stay in `jobs` until the post-deploy migration
# 0006 has moved them all to history. Until then a list of finished jobs reads `jobs` too
# (served there by version 3's list indexes, dropped after the move); after it, not at all.
# Uncorrelated, so evaluated once per statement: a one-time filter above the scan.
_FINISHED_ROWS_MAY_BE_LIVE = "NOT EXISTS (SELECT FROM jobq_schema_migrations WHERE version = 6)"


class Lookup(QueueBase):
    # -- readers -----------------------------------------------------------------------

    async def get(self, job_id: uuid.UUID) -> Job:
        row = await self.pool.fetchrow(_GET, job_id, finished_not_before(job_id))
        if row is None:
            raise JobNotFound(job_id)
        return Job.from_record(row)

    async def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        queue: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        cursor: str | None = None,
    ) -> Page:
        """Newest first by id (ids are UUIDv7: creation order). `cursor` pages stably under
        concurrent inserts."""
        sql, args, n = self._list_query(
            _JOB_COLUMNS, _HISTORY_AS_JOB, status, kind, queue, limit, offset, cursor
        )
        jobs = [Job.from_record(r) for r in await self.pool.fetch(sql, *args)]
        return Page(jobs, encode_cursor(jobs[-1]) if len(jobs) == n else None)

    async def list_summaries(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        queue: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        cursor: str | None = None,
    ) -> SummaryPage:
        """As list_jobs, without reading payload, result or errors from the table."""
        sql, args, n = self._list_query(
            _SUMMARY_COLUMNS, _HISTORY_AS_SUMMARY, status, kind, queue, limit, offset, cursor
        )
        jobs = [JobSummary.from_record(r) for r in await self.pool.fetch(sql, *args)]
        return SummaryPage(jobs, encode_cursor(jobs[-1]) if len(jobs) == n else None)

    def _list_query(
        self,
        live_columns: str,
        history_columns: str,
        status: str | None,
        kind: str | None,
        queue: str | None,
        limit: int | None,
        offset: int,
        cursor: str | None,
    ) -> tuple[str, list[Any], int]:
        """Each table read newest first by id, n + offset rows at most (an index walk that
        stops), then merged. A status filter reads only the table that can hold it; the
        status is written into the statement (it is one of STATUSES), so that the plan prunes
        to the leaves of its class and can use the partial index of cancelled jobs."""
        if status is not None and status not in STATUSES:
            raise InvalidJob("status", f"must be one of {', '.join(STATUSES)}")
        if offset < 0 or offset > MAX_OFFSET:
            raise InvalidJob(
                "offset", f"must be between 0 and {MAX_OFFSET}; page deeper with the cursor"
            )
        n = clamp_limit(limit)
        where: list[str] = [] if status is None else [f"status = '{status}'"]
        args: list[Any] = []
        for column, value in (("kind", kind), ("queue", queue)):
            if value is not None:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        if cursor is not None:
            args.append(decode_cursor(cursor))
            where.append(f"id < ${len(args)}")
        args += [n, offset, n + offset]
        limit_, offset_, each = f"${len(args) - 2}", f"${len(args) - 1}", f"${len(args)}"
        finished = status in TERMINAL_STATUSES
        live_where = [*where, _FINISHED_ROWS_MAY_BE_LIVE] if finished else where
        live = f"SELECT {live_columns} FROM jobs{_where(live_where)} ORDER BY id DESC"
        if status is not None and not finished:
            return f"{live} LIMIT {limit_} OFFSET {offset_}", args[:-1], n
        history = f"SELECT {history_columns} FROM jobs_history{_where(where)} ORDER BY id DESC"
        sql = (
            f"SELECT * FROM ("
            f"({live} LIMIT {each}) UNION ALL ({history} LIMIT {each})"
            f") AS j ORDER BY id DESC LIMIT {limit_} OFFSET {offset_}"
        )
        return sql, args, n


def _where(conditions: list[str]) -> str:
    return f" WHERE {' AND '.join(conditions)}" if conditions else ""
