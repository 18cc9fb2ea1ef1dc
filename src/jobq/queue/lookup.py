"""Reading jobs: one by id, and lists with filters and a cursor."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime, timedelta
from typing import Any

from jobq.queue.base import QueueBase
from jobq.queue.model import (
    _JOB_COLUMNS,
    _SUMMARY_COLUMNS,
    MAX_OFFSET,
    STATUSES,
    InvalidJob,
    Job,
    JobNotFound,
    JobSummary,
    Page,
    SummaryPage,
)
from jobq.queue.validation import clamp_limit


def encode_cursor(job: Job | JobSummary) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position a cursor names. Only the exact text encode_cursor makes is accepted (a UTC
    time and a job id): nothing else a client makes up can reach the database."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_text, _, id_text = raw.partition("|")
        created, job_id = datetime.fromisoformat(created_text), uuid.UUID(id_text)
        canonical = f"{created.isoformat()}|{job_id}"
        if created.utcoffset() != timedelta(0) or canonical != raw:
            raise ValueError("not canonical")
        if base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=") != cursor:
            raise ValueError("not canonical")
        return created, job_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidJob("cursor", "is not a cursor returned by this API") from None


_GET = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1"


class Lookup(QueueBase):
    # -- readers -----------------------------------------------------------------------

    async def get(self, job_id: uuid.UUID) -> Job:
        row = await self.pool.fetchrow(_GET, job_id)
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
        """Newest first (created_at, then id). `cursor` pages stably under concurrent inserts."""
        sql, args, n = self._list_query(_JOB_COLUMNS, status, kind, queue, limit, offset, cursor)
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
            _SUMMARY_COLUMNS, status, kind, queue, limit, offset, cursor
        )
        jobs = [JobSummary.from_record(r) for r in await self.pool.fetch(sql, *args)]
        return SummaryPage(jobs, encode_cursor(jobs[-1]) if len(jobs) == n else None)

    def _list_query(
        self,
        columns: str,
        status: str | None,
        kind: str | None,
        queue: str | None,
        limit: int | None,
        offset: int,
        cursor: str | None,
    ) -> tuple[str, list[Any], int]:
        if status is not None and status not in STATUSES:
            raise InvalidJob("status", f"must be one of {', '.join(STATUSES)}")
        if offset < 0 or offset > MAX_OFFSET:
            raise InvalidJob(
                "offset", f"must be between 0 and {MAX_OFFSET}; page deeper with the cursor"
            )
        n = clamp_limit(limit)
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("status", status), ("kind", kind), ("queue", queue)):
            if value is not None:
                args.append(value)
                where.append(f"{column} = ${len(args)}")
        if cursor is not None:
            created, last_id = decode_cursor(cursor)
            args += [created, last_id]
            where.append(f"(created_at, id) < (${len(args) - 1}, ${len(args)})")
        args += [n, offset]
        sql = (
            f"SELECT {columns} FROM jobs"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY created_at DESC, id DESC LIMIT ${len(args) - 1} OFFSET ${len(args)}"
        )
        return sql, args, n
