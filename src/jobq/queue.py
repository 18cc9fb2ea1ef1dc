"""The queue core: every statement that decides a job's fate lives here.

Lifecycle (River-style, one row per job):

    queued ──claim──▶ running ──complete──▶ succeeded
      ▲                 │ ├──fail (attempts left)──▶ retrying ──claim──▶ running …
      │                 │ ├──fail (attempts spent)─▶ failed_permanent
      │                 │ └──cancel observed, or fail after a cancel request──▶ cancelled
      │                 └──lease expired (rescue)──▶ retrying (after backoff) | failed_permanent
      │                                              | cancelled
      └──────────────────────────retry (operator)◀── failed_permanent | cancelled

Every write by a worker is fenced by the lease token it got at claim time: once a job was
rescued, cancelled or finished elsewhere, a late answer from the old run changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import enum
import hashlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from jobq.backoff import Backoff

STATUSES = ("queued", "running", "retrying", "succeeded", "failed_permanent", "cancelled")
TERMINAL_STATUSES = ("succeeded", "failed_permanent", "cancelled")

NEW_JOB_CHANNEL = "jobq_jobs"
CANCEL_CHANNEL = "jobq_cancel"

DEFAULT_QUEUE = "default"
MAX_NAME_LENGTH = 255
MAX_IDEMPOTENCY_KEY_LENGTH = 255
PRIORITY_MIN, PRIORITY_MAX = -32768, 32767
MAX_ATTEMPTS_MIN, MAX_ATTEMPTS_MAX = 1, 1000
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 50, 200
# The error history a job keeps: the latest entries, each entry's text (and last_error) capped.
# Operator retries keep the history, so without a cap it grows with every failure.
MAX_ERROR_LENGTH = 2000
MAX_ERROR_HISTORY = 20
RUN_AT_MIN = datetime.min.replace(tzinfo=UTC)
RUN_AT_MAX = datetime.max.replace(tzinfo=UTC)
# A deep OFFSET makes the database read and discard every row before it: past this, page
# with the cursor (which costs the same at any depth).
MAX_OFFSET = 10_000


class JobqError(Exception):
    """Base class of the errors the queue core raises on purpose."""


class InvalidJob(JobqError, ValueError):
    """A job's fields are out of bounds; nothing was stored."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class IdempotencyConflict(JobqError):
    """The idempotency key already belongs to a job created by a different request.

    From a bulk enqueue, `index` is the conflicting job's position in the input; when the
    key's first use is in the same input (so no job was stored), `job_id` is None and
    `first_index` names that first use.
    """

    def __init__(
        self,
        key: str,
        job_id: uuid.UUID | None,
        *,
        index: int | None = None,
        first_index: int | None = None,
    ) -> None:
        if job_id is not None:
            message = f"idempotency key {key!r} was already used for job {job_id}"
        else:
            message = f"idempotency key {key!r} is given to two different jobs"
        super().__init__(f"{message} with a different request")
        self.key = key
        self.job_id = job_id
        self.index = index
        self.first_index = first_index


class JobNotFound(JobqError):
    def __init__(self, job_id: uuid.UUID) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class InvalidTransition(JobqError):
    """The job is not in a state that allows the operation."""

    def __init__(self, job_id: uuid.UUID, status: str, operation: str) -> None:
        super().__init__(f"job {job_id} is {status}; cannot {operation}")
        self.job_id = job_id
        self.status = status
        self.operation = operation


@dataclass(frozen=True, slots=True)
class Job:
    id: uuid.UUID
    kind: str
    queue: str
    payload: dict[str, Any]
    status: str
    priority: int
    attempts: int
    # None: not specified at enqueue; the first claim fills in the handler's value.
    max_attempts: int | None
    run_at: datetime
    idempotency_key: str | None
    cancel_requested: bool
    lease_owner: str | None
    lease_token: uuid.UUID | None
    lease_expires_at: datetime | None
    retry_delay_seconds: float | None
    last_error: str | None
    errors: list[dict[str, Any]]
    result: Any
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Job:
        return cls(*map(r.__getitem__, _JOB_FIELDS))  # by name; no per-row dict

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


_JOB_FIELDS = tuple(f.name for f in dataclasses.fields(Job))
_JOB_COLUMNS = ", ".join(_JOB_FIELDS)


@dataclass(frozen=True, slots=True)
class JobSummary:
    """A job without what can be large (payload, result, errors): what lists return."""

    id: uuid.UUID
    kind: str
    queue: str
    status: str
    priority: int
    attempts: int
    max_attempts: int | None
    run_at: datetime
    idempotency_key: str | None
    cancel_requested: bool
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> JobSummary:
        return cls(*map(r.__getitem__, _SUMMARY_FIELDS))


_SUMMARY_FIELDS = tuple(f.name for f in dataclasses.fields(JobSummary))
_SUMMARY_COLUMNS = ", ".join(_SUMMARY_FIELDS)


@dataclass(frozen=True, slots=True)
class NewJob:
    """What a client asks for. Validated by `validate()`; defaults filled by the core."""

    kind: str
    payload: dict[str, Any] = dataclasses.field(default_factory=dict)
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    max_attempts: int | None = None
    run_at: datetime | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class BulkEnqueued:
    id: uuid.UUID
    created: bool  # False: an idempotent replay of a job stored before


@dataclass(frozen=True, slots=True)
class _FirstUse:
    """An idempotency key's first use in a bulk enqueue: a stored job (index None) or a
    position in the input."""

    job_id: uuid.UUID
    fingerprint: str | None
    index: int | None


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    job: Job
    created: bool


class CancelOutcome(enum.Enum):
    CANCELLED = "cancelled"  # was queued or retrying: cancelled now
    PENDING = "pending"  # running: the worker has been asked to stop
    ALREADY_TERMINAL = "already_terminal"


@dataclass(frozen=True, slots=True)
class CancelResult:
    outcome: CancelOutcome
    job: Job


@dataclass(frozen=True, slots=True)
class Lease:
    """A worker's hold on one running job."""

    job_id: uuid.UUID
    token: uuid.UUID


@dataclass(frozen=True, slots=True)
class Completions:
    """What a batch of completions did."""

    held: set[uuid.UUID]  # written: their lease still held
    refused: dict[uuid.UUID, str]  # the database refused the result: why


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    """What one heartbeat learnt, per lease (job id + token: one attempt of a job)."""

    cancel_requested: frozenset[Lease]
    # No longer this worker's: the job was rescued, cancelled, finished or claimed again.
    lost: frozenset[Lease]
    # Still held but not extended: the row was locked by someone else. Retry soon.
    skipped: frozenset[Lease] = frozenset()


@dataclass(frozen=True, slots=True)
class Rescued:
    job_id: uuid.UUID
    kind: str
    status: str


@dataclass(frozen=True, slots=True)
class Page:
    jobs: list[Job]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class SummaryPage:
    jobs: list[JobSummary]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class QueueLag:
    queue: str
    oldest_run_at: datetime
    age_seconds: float


@dataclass(frozen=True, slots=True)
class MinuteCount:
    minute: datetime
    succeeded: int
    failed: int
    cancelled: int


@dataclass(frozen=True, slots=True)
class FailingKind:
    kind: str
    failed: int
    retrying: int
    last_error: str | None
    last_job_id: uuid.UUID
    last_failed_at: datetime


@dataclass(frozen=True, slots=True)
class Unhandled:
    queue: str
    kind: str
    count: int
    oldest_created_at: datetime


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: str
    kinds: list[str]
    queues: list[str]
    concurrency: int
    started_at: datetime
    last_seen_at: datetime


# -- validation and encoding -------------------------------------------------------------


def _check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidJob(field, "must be a non-empty string")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidJob(field, f"must be at most {MAX_NAME_LENGTH} characters")
    if not value.isprintable():
        raise InvalidJob(field, "must not contain control characters")
    return value


def check_idempotency_key(key: str) -> str:
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise InvalidJob("idempotency_key", f"must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters")
    if not all(" " <= ch <= "~" for ch in key):
        raise InvalidJob("idempotency_key", "must be printable ASCII")
    return key


def encode_json(field: str, value: Any) -> str:
    """JSON text Postgres jsonb accepts, or InvalidJob: jsonb cannot hold NUL characters, and
    JSON has no NaN or Infinity (the encoder would write them as null, silently)."""
    try:
        text = orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidJob(field, f"is not JSON Postgres can store ({exc})") from None
    if "\\u0000" in text:
        raise InvalidJob(field, "must not contain \\u0000 (NUL) characters")
    # Only output with a null can hide a non-finite number: most values skip the walk.
    if "null" in text and _has_non_finite(value):
        raise InvalidJob(field, "must not contain NaN or Infinity (JSON has no such numbers)")
    return text


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    return False


def validate(job: NewJob) -> NewJob:
    """Return the job checked (naive run_at taken as UTC), or raise InvalidJob.

    max_attempts stays None when not given: it is resolved when a worker claims the job, from
    that worker's handler, whichever way the job was enqueued."""
    _check_name("kind", job.kind)
    _check_name("queue", job.queue)
    if not isinstance(job.payload, dict):
        raise InvalidJob("payload", "must be a JSON object")
    if isinstance(job.priority, bool) or not isinstance(job.priority, int):
        raise InvalidJob("priority", "must be an integer")
    if not PRIORITY_MIN <= job.priority <= PRIORITY_MAX:
        raise InvalidJob("priority", f"must be between {PRIORITY_MIN} and {PRIORITY_MAX}")
    max_attempts = job.max_attempts
    if max_attempts is not None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise InvalidJob("max_attempts", "must be an integer")
        if not MAX_ATTEMPTS_MIN <= max_attempts <= MAX_ATTEMPTS_MAX:
            raise InvalidJob(
                "max_attempts", f"must be between {MAX_ATTEMPTS_MIN} and {MAX_ATTEMPTS_MAX}"
            )
    run_at = job.run_at
    if run_at is not None:
        if run_at.tzinfo is None:
            run_at = run_at.replace(tzinfo=UTC)  # naive times are UTC
        # The driver reads the first and last representable instants as -/+infinity.
        try:
            in_range = RUN_AT_MIN < run_at.astimezone(UTC) < RUN_AT_MAX
        except OverflowError:
            in_range = False
        if not in_range:
            raise InvalidJob("run_at", "must be after 0001-01-01 and before 9999-12-31 (UTC)")
    if job.idempotency_key is not None:
        check_idempotency_key(job.idempotency_key)
    if run_at is job.run_at:
        return job
    # The constructor, not dataclasses.replace: this runs once per job of a bulk enqueue.
    return NewJob(
        job.kind, job.payload, job.queue, job.priority, max_attempts, run_at, job.idempotency_key
    )


def fingerprint(job: NewJob) -> str:
    """What makes two requests "the same" for idempotency: everything that defines the job."""
    canonical = orjson.dumps(
        {
            "kind": job.kind,
            "payload": job.payload,
            "queue": job.queue,
            "priority": job.priority,
            "max_attempts": job.max_attempts,
            # One instant, one fingerprint, whatever UTC offset the client wrote it in.
            "run_at": job.run_at.astimezone(UTC).isoformat() if job.run_at else None,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


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


def clamp_limit(limit: int | None) -> int:
    if limit is None:
        return LIST_LIMIT_DEFAULT
    return max(1, min(LIST_LIMIT_MAX, limit))


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


def _append_error(errors: str, attempt: str, error: str) -> str:
    """SQL: `errors` with one entry appended, keeping the latest MAX_ERROR_HISTORY entries."""
    return (
        f"jsonb_path_query_array({errors} || jsonb_build_array(jsonb_build_object("
        f"'attempt', {attempt}, 'error', {error}, 'at', now())),"
        f" '$[last - {MAX_ERROR_HISTORY - 1} to last]')"
    )


# -- SQL -----------------------------------------------------------------------------------

_INSERT_QUIET = f"""
INSERT INTO jobs (kind, queue, payload, priority, max_attempts, run_at,
                  idempotency_key, request_fingerprint)
VALUES ($1, $2, $3::text::jsonb, $4, $5, coalesce($6, now()), $7, $8)
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING {_JOB_COLUMNS}
"""

# The same insert, waking workers when it commits.
_INSERT = f"""
WITH ins AS ({_INSERT_QUIET})
SELECT ins.*, pg_notify('{NEW_JOB_CHANNEL}', queue)::text AS _notified FROM ins
"""

_SELECT_BY_KEY = f"""
SELECT {_JOB_COLUMNS}, request_fingerprint FROM jobs WHERE idempotency_key = $1
"""

_INSERT_MANY = f"""
WITH ins AS (
    INSERT INTO jobs (kind, queue, payload, priority, max_attempts, run_at,
                      idempotency_key, request_fingerprint)
    SELECT k, q, p::jsonb, pr, ma, coalesce(ra, now()), ik, fp
    FROM unnest($1::text[], $2::text[], $3::text[], $4::smallint[], $5::int[],
                $6::timestamptz[], $7::text[], $8::text[]) AS t(k, q, p, pr, ma, ra, ik, fp)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, queue, idempotency_key
), notified AS (
    SELECT pg_notify('{NEW_JOB_CHANNEL}', q) FROM (SELECT DISTINCT queue AS q FROM ins) AS qs
)
SELECT id, idempotency_key, (SELECT count(*) FROM notified) AS _n FROM ins
"""

_GET = f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1"

# What a claim hands the worker: every column but the large ones it never reads (the error
# history, last_error, the result), which come back empty.
_CLAIM_RETURNING = ", ".join(
    {"errors": "'[]'::jsonb AS errors", "last_error": "NULL::text AS last_error",
     "result": "NULL::jsonb AS result"}.get(f, "j." + f)
    for f in _JOB_FIELDS
)  # fmt: skip

# One statement: pick due jobs in claim order, skipping rows other workers hold, and lease them.
# Bounded by jobs_queue_claim_idx (queue, priority, run_at, id): a loose index scan finds the
# (queue, priority) pairs that have waiting jobs, one index probe each; per pair, only due rows
# are read, in (run_at, id) order. Another queue's backlog and future-dated jobs cost nothing.
# Priorities are taken one at a time, lowest first, and the walk stops once $4 rows are held:
# a row locked costs a write, so a claim locks the rows it takes and, at the last priority it
# reaches, at most $4 per queue; not $4 for every priority waiting.
# max_attempts left unspecified (NULL) becomes the claiming worker's value for the kind ($6,
# $7), or $8.
_CLAIM = f"""
WITH RECURSIVE pairs AS (
    (SELECT q.queue, p.priority
     FROM unnest($3::text[]) AS q(queue)
     CROSS JOIN LATERAL (
         SELECT priority FROM jobs
         WHERE status IN ('queued', 'retrying') AND queue = q.queue
         ORDER BY priority LIMIT 1
     ) AS p)
    UNION ALL
    SELECT pairs.queue, p.priority
    FROM pairs
    CROSS JOIN LATERAL (
        SELECT priority FROM jobs
        WHERE status IN ('queued', 'retrying') AND queue = pairs.queue
          AND priority > pairs.priority
        ORDER BY priority LIMIT 1
    ) AS p
), picked AS (
    -- No ORDER BY here: a sort would read every priority. The nested loop keeps the order of
    -- `level`, so the LIMIT takes the lowest priorities and stops reading.
    SELECT c.id
    FROM (SELECT DISTINCT priority FROM pairs ORDER BY priority) AS level
    CROSS JOIN LATERAL (
        SELECT d.id, d.run_at
        FROM pairs
        CROSS JOIN LATERAL (
            SELECT id, run_at FROM jobs
            WHERE status IN ('queued', 'retrying') AND queue = pairs.queue
              AND priority = level.priority AND run_at <= now()
              AND kind = ANY($2::text[])
            ORDER BY run_at, id
            LIMIT $4
            FOR UPDATE SKIP LOCKED
        ) AS d
        WHERE pairs.priority = level.priority
        ORDER BY d.run_at, d.id
        LIMIT $4
    ) AS c
    LIMIT $4
)
UPDATE jobs AS j
SET status = 'running',
    attempts = j.attempts + 1,
    max_attempts = coalesce(
        j.max_attempts,
        (SELECT m.n FROM unnest($6::text[], $7::int[]) AS m(kind, n) WHERE m.kind = j.kind),
        $8),
    started_at = now(),
    updated_at = now(),
    lease_owner = $1,
    lease_token = gen_random_uuid(),
    lease_expires_at = now() + make_interval(secs => $5)
FROM picked
WHERE j.id = picked.id
RETURNING {_CLAIM_RETURNING}
"""

_COMPLETE_MANY = """
UPDATE jobs AS j
SET status = 'succeeded',
    result = r.result::jsonb,
    finished_at = now(),
    updated_at = now(),
    lease_token = NULL,
    lease_expires_at = NULL
FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS r(id, token, result)
WHERE j.id = r.id AND j.lease_token = r.token AND j.status = 'running'
RETURNING j.id
"""

# A failed attempt retries only when attempts are left and nobody asked to cancel: after a
# cancel request (202) a failing or timed-out attempt ends the job cancelled. The condition is
# repeated inline, not computed in a CTE: SET sees the row as locked, after any cancel request
# that committed while this statement waited for the row.
_RETRIES = "(NOT $5 AND NOT cancel_requested AND attempts < max_attempts)"
_FAIL = f"""
UPDATE jobs
SET status = CASE WHEN {_RETRIES} THEN 'retrying'
                  WHEN cancel_requested THEN 'cancelled'
                  ELSE 'failed_permanent' END,
    run_at = CASE WHEN {_RETRIES} THEN now() + make_interval(secs => $4) ELSE run_at END,
    retry_delay_seconds = CASE WHEN {_RETRIES} THEN $4 ELSE retry_delay_seconds END,
    finished_at = CASE WHEN {_RETRIES} THEN NULL ELSE now() END,
    last_error = $3,
    errors = {_append_error("errors", "attempts", "$3::text")},
    updated_at = now(),
    lease_token = NULL,
    lease_expires_at = NULL
WHERE id = $1 AND lease_token = $2 AND status = 'running'
RETURNING status
"""

_CANCELLED_BY_WORKER = f"""
UPDATE jobs
SET status = 'cancelled',
    last_error = $3,
    errors = {_append_error("errors", "attempts", "$3::text")},
    finished_at = now(),
    updated_at = now(),
    lease_token = NULL,
    lease_expires_at = NULL
WHERE id = $1 AND lease_token = $2 AND status = 'running'
RETURNING status
"""

# Graceful shutdown: the interrupted run does not count as an attempt.
_RELEASE = """
UPDATE jobs AS j
SET status = CASE WHEN j.cancel_requested THEN 'cancelled'
                  WHEN j.attempts <= 1 THEN 'queued' ELSE 'retrying' END,
    attempts = CASE WHEN j.cancel_requested THEN j.attempts ELSE j.attempts - 1 END,
    finished_at = CASE WHEN j.cancel_requested THEN now() END,
    started_at = CASE WHEN j.cancel_requested THEN j.started_at END,
    run_at = now(),
    updated_at = now(),
    lease_owner = NULL,
    lease_token = NULL,
    lease_expires_at = NULL
FROM unnest($1::uuid[], $2::uuid[]) AS r(id, token)
WHERE j.id = r.id AND j.lease_token = r.token AND j.status = 'running'
RETURNING j.id, j.queue
"""

# Extends the leases a worker still holds. A row locked by someone else (an operator's
# SELECT ... FOR UPDATE, a long transaction) is skipped, not waited for: one row must not stall
# the heartbeat of every other lease. `held` is a plain read, which no row lock blocks, so a
# skipped lease is told apart from a lost one. The expiry counts from the time of the write
# (clock_timestamp()), not from the start of the statement (now()).
_HEARTBEAT = """
WITH r AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[]) AS r(id, token)
), held AS (
    SELECT j.id, j.lease_token, j.cancel_requested
    FROM jobs AS j JOIN r ON j.id = r.id AND j.lease_token = r.token
    WHERE j.status = 'running'
), free AS (
    SELECT j.id
    FROM jobs AS j JOIN r ON j.id = r.id AND j.lease_token = r.token
    WHERE j.status = 'running'
    FOR UPDATE OF j SKIP LOCKED
), extended AS (
    UPDATE jobs AS j
    SET lease_expires_at = clock_timestamp() + make_interval(secs => $3)
    FROM free
    WHERE j.id = free.id
    RETURNING j.id, j.lease_token, j.cancel_requested
)
SELECT id, lease_token, cancel_requested, true AS extended FROM extended
UNION ALL
SELECT id, lease_token, cancel_requested, false FROM held
WHERE id NOT IN (SELECT id FROM extended)
"""

# Runs whose worker stopped heartbeating. Rows locked by a live transaction are skipped, so
# every worker can run this at any time. The retry waits the job's backoff, drawn as
# `Backoff.next_delay` draws it: a job that takes its worker down (OOM, segfault) must not take
# the next one down at once. Bounds per kind come in $2..$4; other kinds get $5, $6.
_RESCUE = f"""
WITH lost AS (
    SELECT j.id,
           least(b.cap, b.base + random() * (greatest(b.base,
                 coalesce(j.retry_delay_seconds, b.base) * 3) - b.base)) AS delay
    FROM jobs AS j
    LEFT JOIN unnest($2::text[], $3::float8[], $4::float8[]) AS k(kind, base, cap)
           ON k.kind = j.kind
    CROSS JOIN LATERAL (
        SELECT coalesce(k.base, $5::float8) AS base, coalesce(k.cap, $6::float8) AS cap
    ) AS b
    WHERE j.status = 'running' AND j.lease_expires_at < now()
    ORDER BY j.lease_expires_at
    LIMIT $1
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE jobs AS j
SET status = CASE WHEN j.cancel_requested THEN 'cancelled'
                  WHEN j.attempts < j.max_attempts THEN 'retrying'
                  ELSE 'failed_permanent' END,
    last_error = 'worker lost: lease held by ' || coalesce(j.lease_owner, '?')
                 || ' expired at ' || j.lease_expires_at::text,
    errors = {
    _append_error(
        "j.errors",
        "j.attempts",
        "'worker lost: lease held by ' || coalesce(j.lease_owner, '?') || ' expired'",
    )
},
    run_at = CASE WHEN NOT j.cancel_requested AND j.attempts < j.max_attempts
                  THEN now() + make_interval(secs => lost.delay) ELSE j.run_at END,
    retry_delay_seconds = CASE WHEN NOT j.cancel_requested AND j.attempts < j.max_attempts
                               THEN lost.delay ELSE j.retry_delay_seconds END,
    finished_at = CASE WHEN j.cancel_requested OR j.attempts >= j.max_attempts
                       THEN now() END,
    updated_at = now(),
    lease_token = NULL,
    lease_expires_at = NULL
FROM lost
WHERE j.id = lost.id
RETURNING j.id, j.kind, j.status, j.queue
"""

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

_COUNTS = """
SELECT queue, status, count(*)::bigint AS n FROM jobs GROUP BY queue, status
"""

# -- operator views (GET /stats, the dashboard, `jobq status`): one statement each ----------

# Waiting jobs that are due, per queue: how far behind each queue is. Reads the claim index.
_OLDEST_DUE = """
SELECT queue, min(run_at) AS oldest_run_at,
       extract(epoch FROM now() - min(run_at))::float8 AS age_seconds
FROM jobs
WHERE status IN ('queued', 'retrying') AND run_at <= now()
GROUP BY queue
"""

# Jobs that ended in each of the last `$1` minutes (this one included), by final status, one
# row per minute even when nothing finished. One range scan of jobs_finished_idx per minute.
_FINISHED_PER_MINUTE = """
WITH minutes AS (
    SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => $1 - 1),
                           date_trunc('minute', now()), interval '1 minute') AS minute
)
SELECT m.minute,
       count(j.id) FILTER (WHERE j.status = 'succeeded')::bigint AS succeeded,
       count(j.id) FILTER (WHERE j.status = 'failed_permanent')::bigint AS failed,
       count(j.id) FILTER (WHERE j.status = 'cancelled')::bigint AS cancelled
FROM minutes AS m
LEFT JOIN jobs AS j
       ON j.finished_at >= m.minute AND j.finished_at < m.minute + interval '1 minute'
GROUP BY m.minute
ORDER BY m.minute
"""

# Kinds with the most failures lately: failed for good in the window, or waiting to retry.
_FAILING_KINDS = """
SELECT kind,
       count(*) FILTER (WHERE status = 'failed_permanent')::bigint AS failed,
       count(*) FILTER (WHERE status = 'retrying')::bigint AS retrying,
       (array_agg(last_error ORDER BY updated_at DESC))[1] AS last_error,
       (array_agg(id ORDER BY updated_at DESC))[1] AS last_job_id,
       max(updated_at) AS last_failed_at
FROM jobs
WHERE (status = 'failed_permanent' AND finished_at >= now() - make_interval(mins => $1))
   OR status = 'retrying'
GROUP BY kind
ORDER BY count(*) DESC, kind
LIMIT $2
"""

# Waiting jobs whose kind and queue no live worker takes: they will wait forever.
_UNHANDLED = """
SELECT j.queue, j.kind, count(*)::bigint AS n, min(j.created_at) AS oldest_created_at
FROM jobs AS j
WHERE j.status IN ('queued', 'retrying')
  AND NOT EXISTS (
      SELECT 1 FROM jobq_workers AS w
      WHERE w.expires_at > now() AND j.kind = ANY(w.kinds) AND j.queue = ANY(w.queues))
GROUP BY j.queue, j.kind
ORDER BY n DESC, j.queue, j.kind
"""

_LIVE_WORKERS = """
SELECT worker_id, kinds, queues, concurrency, started_at, last_seen_at
FROM jobq_workers WHERE expires_at > now() ORDER BY started_at, worker_id
"""

# A worker announces itself (and clears rows of workers long gone).
_WORKER_SEEN = """
WITH gone AS (
    DELETE FROM jobq_workers WHERE expires_at < now() - interval '1 hour'
)
INSERT INTO jobq_workers (worker_id, kinds, queues, concurrency, expires_at)
VALUES ($1, $2::text[], $3::text[], $4, now() + make_interval(secs => $5))
ON CONFLICT (worker_id) DO UPDATE
SET kinds = excluded.kinds, queues = excluded.queues, concurrency = excluded.concurrency,
    last_seen_at = now(), expires_at = excluded.expires_at
"""


class _WakeUps:
    """Debounces the NOTIFY that wakes workers after single inserts, per queue.

    PostgreSQL serialises the commits of transactions that sent a NOTIFY, fsync included, so
    a NOTIFY on every insert caps concurrent producers at one commit at a time. The first
    insert in a window notifies as part of its own statement (no added latency); inserts
    later in the window commit quietly, and one trailing NOTIFY at the end of the window,
    sent after they committed, wakes workers for all of them. Workers also poll, so a
    NOTIFY lost with a dying process delays jobs, never loses them.
    """

    def __init__(self, pool: asyncpg.Pool, window: float) -> None:
        self.pool = pool
        self.window = window
        self._last: dict[str, float] = {}
        self._pending: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None

    def claim_inline(self, queue: str) -> bool:
        """True when this insert should carry the NOTIFY itself."""
        now = time.monotonic()
        if now - self._last.get(queue, -math.inf) >= self.window:
            self._last[queue] = now
            return True
        return False

    def committed_quietly(self, queue: str) -> None:
        self._pending.add(queue)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            # At the end of the window opened by the last inline NOTIFY: a quiet insert waits
            # at most one window for its wake-up, and usually much less.
            opened = min(self._last.get(q, -math.inf) for q in self._pending)
            await asyncio.sleep(max(0.0, opened + self.window - time.monotonic()))
            queues, self._pending = self._pending, set()
            now = time.monotonic()
            for queue in queues:
                self._last[queue] = now
            with contextlib.suppress(Exception):  # workers poll: a lost wake-up only delays
                await self.pool.execute(
                    "SELECT pg_notify($1, q) FROM unnest($2::text[]) AS q",
                    NEW_JOB_CHANNEL,
                    sorted(queues),
                )


# A connection of one's own or one borrowed from a pool.
_Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class Queue:
    """Queue operations over an asyncpg pool. Safe to share between tasks."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        default_max_attempts: int = 3,
        default_backoff: Backoff | None = None,
        notify_window: float = 0.002,
    ) -> None:
        self.pool = pool
        # For a job claimed with no max_attempts of its own and none from its handler.
        self.default_max_attempts = default_max_attempts
        self.default_backoff = default_backoff or Backoff()
        self._wake_ups = _WakeUps(pool, notify_window)

    # -- producers ---------------------------------------------------------------------

    async def enqueue(self, new: NewJob) -> EnqueueResult:
        """Insert a job; with an idempotency key, return the existing job for the same request.

        Race-safe: concurrent inserts with one key wait on each other in the unique index, and
        exactly one creates the row.
        """
        job = validate(new)
        payload = encode_json("payload", job.payload)
        fp = fingerprint(job) if job.idempotency_key is not None else None
        args = (
            job.kind,
            job.queue,
            payload,
            job.priority,
            job.max_attempts,
            job.run_at,
            job.idempotency_key,
            fp,
        )
        async with self.pool.acquire() as conn:
            for _ in range(3):
                inline = self._wake_ups.claim_inline(job.queue)
                row = await conn.fetchrow(_INSERT if inline else _INSERT_QUIET, *args)
                if row is not None:
                    if not inline:
                        self._wake_ups.committed_quietly(job.queue)
                    return EnqueueResult(Job.from_record(row), created=True)
                # The key exists. A fresh statement sees the committed row.
                existing = await conn.fetchrow(_SELECT_BY_KEY, job.idempotency_key)
                if existing is None:
                    continue  # deleted in between: try the insert again
                if existing["request_fingerprint"] != fp:
                    raise IdempotencyConflict(job.idempotency_key or "", existing["id"])
                return EnqueueResult(Job.from_record(existing), created=False)
        raise RuntimeError("idempotent insert did not settle")  # pragma: no cover

    async def enqueue_many(
        self, jobs: Sequence[NewJob], *, connection: _Connection | None = None
    ) -> list[uuid.UUID]:
        """Insert many jobs in one round trip; returns their ids in input order.

        Idempotency keys are honoured: a key that exists with the same request yields the
        existing id; with a different request the whole batch is rejected and nothing is stored.
        With `connection`, the insert joins that connection's open transaction.
        """
        if not jobs:
            return []
        checked = [validate(j) for j in jobs]
        async with self._connection(connection) as conn, conn.transaction():
            stored = await self._insert_batch(conn, checked, 0, {})
        return [s.id for s in stored]

    async def enqueue_all(
        self,
        jobs: Sequence[NewJob],
        *,
        batch_size: int = 500,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[BulkEnqueued]:
        """`enqueue_many` in batches of `batch_size`, all in one transaction: every job is
        stored or none is (an idempotency conflict in the last batch undoes the first ones),
        and workers are woken when it commits. `on_batch(n)` is called after each batch.
        Returns, in input order, each job's id and whether this call created it."""
        checked = [validate(j) for j in jobs]  # every job checked before the first insert
        stored: list[BulkEnqueued] = []
        first_uses: dict[str, _FirstUse] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            for start in range(0, len(checked), batch_size):
                chunk = checked[start : start + batch_size]
                stored += await self._insert_batch(conn, chunk, start, first_uses)
                if on_batch is not None:
                    on_batch(len(chunk))
        return stored

    async def _insert_batch(
        self,
        conn: _Connection,
        checked: Sequence[NewJob],
        offset: int,
        first_uses: dict[str, _FirstUse],
    ) -> list[BulkEnqueued]:
        """One round trip for `checked` (validated jobs, positions `offset`.. of the caller's
        input), within the caller's transaction. `first_uses` carries each key's first use
        across batches, so that a key reused within one input is told apart from one stored
        before it."""
        payloads = [encode_json("payload", j.payload) for j in checked]
        fps = [fingerprint(j) if j.idempotency_key is not None else None for j in checked]
        rows = await conn.fetch(
            _INSERT_MANY,
            [j.kind for j in checked],
            [j.queue for j in checked],
            payloads,
            [j.priority for j in checked],
            [j.max_attempts for j in checked],
            [j.run_at for j in checked],
            [j.idempotency_key for j in checked],
            fps,
        )
        if all(j.idempotency_key is None for j in checked):
            return [BulkEnqueued(r["id"], True) for r in rows]
        created = {r["idempotency_key"]: r["id"] for r in rows if r["idempotency_key"] is not None}
        missing = {
            j.idempotency_key
            for j in checked
            if j.idempotency_key and j.idempotency_key not in created
            and j.idempotency_key not in first_uses
        }  # fmt: skip
        if missing:
            for r in await conn.fetch(
                "SELECT id, idempotency_key, request_fingerprint FROM jobs"
                " WHERE idempotency_key = ANY($1::text[])",
                list(missing),
            ):
                first_uses[r["idempotency_key"]] = _FirstUse(
                    r["id"], r["request_fingerprint"], index=None
                )
        out: list[BulkEnqueued] = []
        unkeyed = iter(r["id"] for r in rows if r["idempotency_key"] is None)
        for i, (j, fp) in enumerate(zip(checked, fps, strict=True), start=offset):
            key = j.idempotency_key
            if key is None:
                out.append(BulkEnqueued(next(unkeyed), True))
                continue
            first = first_uses.get(key)
            if first is None:  # created by this batch, at its first use
                first = first_uses[key] = _FirstUse(created[key], fp, index=i)
                out.append(BulkEnqueued(first.job_id, True))
                continue
            if first.fingerprint != fp:
                if first.index is None:  # stored before this call
                    raise IdempotencyConflict(key, first.job_id, index=i)
                raise IdempotencyConflict(key, None, index=i, first_index=first.index)
            out.append(BulkEnqueued(first.job_id, False))
        return out

    @contextlib.asynccontextmanager
    async def _connection(self, conn: _Connection | None) -> AsyncIterator[_Connection]:
        if conn is not None:
            yield conn
            return
        async with self.pool.acquire() as acquired:
            yield acquired

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

    async def counts(self) -> list[tuple[str, str, int]]:
        """(queue, status, count) for every pair present."""
        rows = await self.pool.fetch(_COUNTS)
        return [(r["queue"], r["status"], r["n"]) for r in rows]

    async def oldest_due(self) -> list[QueueLag]:
        """Per queue with due jobs waiting: the oldest one's due time and age."""
        rows = await self.pool.fetch(_OLDEST_DUE)
        return [QueueLag(r["queue"], r["oldest_run_at"], r["age_seconds"]) for r in rows]

    async def finished_per_minute(self, minutes: int = 15) -> list[MinuteCount]:
        """Jobs that ended in each of the last `minutes` minutes (this one included), oldest
        first, by final status."""
        rows = await self.pool.fetch(_FINISHED_PER_MINUTE, minutes)
        return [MinuteCount(r["minute"], r["succeeded"], r["failed"], r["cancelled"]) for r in rows]

    async def failing_kinds(self, minutes: int = 15, limit: int = 5) -> list[FailingKind]:
        """Kinds with the most jobs failed in the last `minutes` or now waiting to retry."""
        rows = await self.pool.fetch(_FAILING_KINDS, minutes, limit)
        return [
            FailingKind(
                r["kind"],
                r["failed"],
                r["retrying"],
                r["last_error"],
                r["last_job_id"],
                r["last_failed_at"],
            )
            for r in rows
        ]

    async def unhandled(self) -> list[Unhandled]:
        """Waiting jobs, by queue and kind, that no live worker would claim."""
        rows = await self.pool.fetch(_UNHANDLED)
        return [Unhandled(r["queue"], r["kind"], r["n"], r["oldest_created_at"]) for r in rows]

    async def workers(self) -> list[WorkerInfo]:
        """Workers that announced themselves and have not expired."""
        rows = await self.pool.fetch(_LIVE_WORKERS)
        return [
            WorkerInfo(
                r["worker_id"],
                list(r["kinds"]),
                list(r["queues"]),
                r["concurrency"],
                r["started_at"],
                r["last_seen_at"],
            )
            for r in rows
        ]

    async def worker_seen(
        self,
        worker_id: str,
        kinds: Sequence[str],
        queues: Sequence[str],
        concurrency: int,
        *,
        ttl_seconds: float,
    ) -> None:
        """A worker is alive and takes these kinds and queues, for the next `ttl_seconds`."""
        await self.pool.execute(
            _WORKER_SEEN, worker_id, list(kinds), list(queues), concurrency, float(ttl_seconds)
        )

    async def worker_gone(self, worker_id: str) -> None:
        await self.pool.execute("DELETE FROM jobq_workers WHERE worker_id = $1", worker_id)

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

    # -- workers -----------------------------------------------------------------------

    async def claim(
        self,
        worker: str,
        kinds: Sequence[str],
        queues: Sequence[str],
        n: int,
        *,
        lease_seconds: float,
        max_attempts: Mapping[str, int] | None = None,
        conn: asyncpg.Connection | None = None,
    ) -> list[Job]:
        """Lease up to n due jobs of the given kinds and queues, in claim order.

        A job enqueued without max_attempts gets `max_attempts[kind]` (the handler's value)
        or `default_max_attempts`, fixed from this first claim on. The jobs returned carry no
        error history, last_error or result (see `_CLAIM_RETURNING`).
        """
        if n <= 0 or not kinds or not queues:
            return []
        per_kind = max_attempts or {}
        args = (
            worker,
            list(kinds),
            list(queues),
            n,
            float(lease_seconds),
            list(per_kind),
            list(per_kind.values()),
            self.default_max_attempts,
        )
        rows = await (conn or self.pool).fetch(_CLAIM, *args)
        jobs = [Job.from_record(r) for r in rows]
        jobs.sort(key=lambda j: (j.priority, j.run_at, j.id))
        return jobs

    async def complete_many(
        self,
        done: Iterable[tuple[Lease, str]],
        *,
        conn: asyncpg.Connection | None = None,
    ) -> Completions:
        """Mark runs succeeded, in as few statements as the database allows.

        Results come as JSON text from `encode_json`. A result the database still refuses
        (a character the database encoding cannot represent, a value past a jsonb limit)
        must fail only its own job: a refused batch is split in halves until the rows it
        refuses stand alone, and every other row is written. The caller fails the refused.
        """
        batch = list(done)
        completions = Completions(set(), {})
        await self._complete(batch, completions, conn)
        return completions

    async def _complete(
        self,
        batch: list[tuple[Lease, str]],
        into: Completions,
        conn: asyncpg.Connection | None,
    ) -> None:
        if not batch:
            return
        try:
            rows = await (conn or self.pool).fetch(
                _COMPLETE_MANY,
                [lease.job_id for lease, _ in batch],
                [lease.token for lease, _ in batch],
                [result for _, result in batch],
            )
        except asyncpg.PostgresError as exc:
            if not _refuses_a_value(exc):
                raise  # an outage or a timeout: the caller retries the batch
            if len(batch) == 1:
                into.refused[batch[0][0].job_id] = _reason(exc)
                return
            middle = len(batch) // 2
            await self._complete(batch[:middle], into, conn)
            await self._complete(batch[middle:], into, conn)
            return
        into.held.update(r["id"] for r in rows)

    async def complete(self, lease: Lease, result: Any = None) -> bool:
        """Mark one run succeeded; False when the lease was lost. InvalidJob when the result
        cannot be stored."""
        completions = await self.complete_many([(lease, encode_json("result", result))])
        if lease.job_id in completions.refused:
            raise InvalidJob("result", completions.refused[lease.job_id])
        return lease.job_id in completions.held

    async def fail_permanently(self, lease: Lease, error: str) -> str | None:
        """End a run failed for good (or cancelled, when a cancel was requested), attempts
        left or not; None when the lease was lost."""
        row = await self.pool.fetchrow(
            _FAIL, lease.job_id, lease.token, _truncate(error), 0.0, True
        )
        return None if row is None else str(row["status"])

    async def fail(
        self,
        job: Job,
        error: str,
        *,
        backoff: Backoff | None = None,
        permanent: bool = False,
    ) -> str | None:
        """Record a failed attempt: retrying after a backoff delay, or failed_permanent.

        Returns the new status, or None when the lease was lost (the row is left alone).
        """
        assert job.lease_token is not None, "fail() needs a claimed job"
        delay = (backoff or self.default_backoff).next_delay(job.retry_delay_seconds)
        row = await self.pool.fetchrow(
            _FAIL, job.id, job.lease_token, _truncate(error), float(delay), permanent
        )
        return None if row is None else str(row["status"])

    async def mark_cancelled(self, lease: Lease, reason: str = "cancelled on request") -> bool:
        """The handler stopped for a cancel request: the run ends cancelled."""
        row = await self.pool.fetchrow(
            _CANCELLED_BY_WORKER, lease.job_id, lease.token, _truncate(reason)
        )
        return row is not None

    async def release(self, leases: Sequence[Lease]) -> list[uuid.UUID]:
        """Give running jobs back without counting the attempt (worker shutting down)."""
        if not leases:
            return []
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                _RELEASE, [lease.job_id for lease in leases], [lease.token for lease in leases]
            )
            for q in {r["queue"] for r in rows}:
                await conn.execute("SELECT pg_notify($1, $2)", NEW_JOB_CHANNEL, q)
        return [r["id"] for r in rows]

    async def heartbeat(
        self,
        leases: Sequence[Lease],
        *,
        lease_seconds: float,
        conn: asyncpg.Connection | None = None,
        timeout: float | None = None,
    ) -> HeartbeatResult:
        """Extend leases; report runs asked to cancel, runs this worker no longer holds, and
        runs whose row was locked by someone else (held, but not extended this time)."""
        if not leases:
            return HeartbeatResult(frozenset(), frozenset())
        rows = await (conn or self.pool).fetch(
            _HEARTBEAT,
            [lease.job_id for lease in leases],
            [lease.token for lease in leases],
            float(lease_seconds),
            timeout=timeout,
        )
        held = {Lease(r["id"], r["lease_token"]): r for r in rows}
        return HeartbeatResult(
            cancel_requested=frozenset(k for k, r in held.items() if r["cancel_requested"]),
            lost=frozenset(leases) - held.keys(),
            skipped=frozenset(k for k, r in held.items() if not r["extended"]),
        )

    async def rescue(
        self, limit: int = 1000, *, backoffs: Mapping[str, Backoff] | None = None
    ) -> list[Rescued]:
        """Return running jobs whose lease expired to the queue (or end them). Idempotent.

        A job with attempts left is retried after its backoff: `backoffs` by kind (a worker
        passes its handlers'), `default_backoff` for any other kind.
        """
        kinds = list(backoffs or {})
        bounds = [(backoffs or {})[k] for k in kinds]
        args = (
            kinds,
            [b.base for b in bounds],
            [b.cap for b in bounds],
            self.default_backoff.base,
            self.default_backoff.cap,
        )
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_RESCUE, limit, *args)
            for q in {r["queue"] for r in rows if r["status"] == "retrying"}:
                await conn.execute("SELECT pg_notify($1, $2)", NEW_JOB_CHANNEL, q)
        return [Rescued(r["id"], r["kind"], r["status"]) for r in rows]


def _refuses_a_value(exc: asyncpg.PostgresError) -> bool:
    """The statement failed on a value it was given (SQLSTATE class 22, data exception, or 54,
    program limit exceeded), not on the database's state: retrying it cannot help."""
    return str(getattr(exc, "sqlstate", "") or "")[:2] in ("22", "54")


def _reason(exc: asyncpg.PostgresError) -> str:
    detail = getattr(exc, "detail", None)
    message = str(getattr(exc, "message", None) or exc)
    return f"{message} ({detail})" if detail else message


def lease_of(job: Job) -> Lease:
    assert job.lease_token is not None, "job is not leased"
    return Lease(job.id, job.lease_token)
