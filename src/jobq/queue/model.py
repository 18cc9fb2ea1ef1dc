"""Constants, errors and the value types of the queue core."""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

STATUSES = ("queued", "running", "retrying", "succeeded", "failed_permanent", "cancelled")
TERMINAL_STATUSES = ("succeeded", "failed_permanent", "cancelled")

NEW_JOB_CHANNEL = "jobq_jobs"
CANCEL_CHANNEL = "jobq_cancel"
# A job someone waits on ended, or its progress changed: the payload is the job's id.
JOB_EVENTS_CHANNEL = "jobq_job_events"

DEFAULT_QUEUE = "default"
MAX_NAME_LENGTH = 255
MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_CONCURRENCY_KEY_LENGTH = 255
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
    """A job's fields are out of bounds; nothing was stored. `index`: from an enqueue of many,
    the job's position in the input, when known (an enqueue middleware that refuses one of the
    jobs it is handed names it so)."""

    def __init__(self, field: str, message: str, *, index: int | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.index = index


class IdempotencyConflict(JobqError):
    """The idempotency key already belongs to a job created by a different request.

    From a bulk enqueue, `index` is the conflicting job's position in the input; when the
    key's first use is in the same input (so no job was stored), `job_id` is None and
    `first_index` names that first use. `gone`: the same request, but its job was removed
    (by retention) while the key is still remembered, so there is no job to return.
    """

    def __init__(
        self,
        key: str,
        job_id: uuid.UUID | None,
        *,
        index: int | None = None,
        first_index: int | None = None,
        gone: bool = False,
    ) -> None:
        if gone:
            message = (
                f"idempotency key {key!r} was used for job {job_id}, which no longer exists;"
                " the key is remembered for the idempotency window after the job's creation"
            )
        elif job_id is not None:
            message = (
                f"idempotency key {key!r} was already used for job {job_id}"
                " with a different request"
            )
        else:
            message = (
                f"idempotency key {key!r} is given to two different jobs with a different request"
            )
        super().__init__(message)
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
    # The tenant, customer or account the job belongs to: per-key limits and fair share group
    # by it (docs/flow-control.md). None: no key.
    concurrency_key: str | None
    # What the handler last reported (ctx.progress): fraction, message, attempt, updated_at.
    progress: dict[str, Any] | None = None
    # The enqueuer's trace context (jobq.otel), or None; not shown by the API.
    trace_context: dict[str, str] | None = None

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

# The columns of `jobs_history`, where a job goes when it ends (docs/storage.md). It keeps no
# lease and no retry delay (a job that ended holds neither), and its updated_at is finished_at.
_HISTORY_FIELDS = (
    "id", "kind", "queue", "payload", "status", "priority", "attempts", "max_attempts", "run_at",
    "idempotency_key", "cancel_requested", "lease_owner", "last_error", "errors", "result",
    "created_at", "started_at", "finished_at", "concurrency_key", "progress", "watched",
    "trace_context",
)  # fmt: skip
_HISTORY_COLUMNS = ", ".join(_HISTORY_FIELDS)
_NOT_IN_HISTORY = {
    "lease_token": "NULL::uuid AS lease_token",
    "lease_expires_at": "NULL::timestamptz AS lease_expires_at",
    "retry_delay_seconds": "NULL::float8 AS retry_delay_seconds",
    "updated_at": "finished_at AS updated_at",
}
# A history row read as a `Job` / a `JobSummary`, so that it unions with rows of `jobs`.
_HISTORY_AS_JOB = ", ".join(_NOT_IN_HISTORY.get(f, f) for f in _JOB_FIELDS)
_HISTORY_AS_SUMMARY = ", ".join(_NOT_IN_HISTORY.get(f, f) for f in _SUMMARY_FIELDS)


def notify_watchers(row: str) -> str:
    """SQL for a RETURNING list: a NOTIFY on JOB_EVENTS_CHANNEL when `row` (the alias of a
    `jobs` row an ending or a progress write touches) is watched. Nobody waits: no NOTIFY, and
    so no serialised commit."""
    return (
        f"CASE WHEN {row}.watched THEN pg_notify('{JOB_EVENTS_CHANNEL}', {row}.id::text) END"
        " AS _watched"
    )


def into_history(source: str, **changed: str) -> str:
    """SQL: insert the rows of `source` (a CTE of `jobs` rows, e.g. from DELETE ... RETURNING)
    into `jobs_history`, every column as it is unless `changed` gives its new value."""
    values = ", ".join(changed.get(c, f"{source}.{c}") for c in _HISTORY_FIELDS)
    return f"INSERT INTO jobs_history ({_HISTORY_COLUMNS})\n    SELECT {values} FROM {source}"


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
    # Groups jobs for per-key limits and fair share (docs/flow-control.md).
    concurrency_key: str | None = None
    # Propagation fields of the enqueuer's trace (`traceparent`, `tracestate`), stored with
    # the job for the span of its run to link to; set by jobq.otel. Not part of the request
    # an idempotency key stands for.
    trace_context: Mapping[str, str] | None = None


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
