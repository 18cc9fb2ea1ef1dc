"""The queue core: every statement that decides a job's fate lives in this package.

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

One module per concern: `enqueue` (producers), `lookup` (get and list), `operator` (cancel,
retry), `leases` (what workers do: claim, complete, fail, release, heartbeat, rescue), `flow`
(pause, limits and the claim under them), `views`
(operator views), `presence` (live workers); `model` and `validation` hold the types and checks.
"""

from jobq.queue.base import Connection
from jobq.queue.core import Queue
from jobq.queue.flow import FlowState, Limits, LimitUsage, QueueInfo, TooManyPaused, parse_rate
from jobq.queue.leases import lease_of
from jobq.queue.model import (
    CANCEL_CHANNEL,
    DEFAULT_QUEUE,
    JOB_EVENTS_CHANNEL,
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    MAX_ATTEMPTS_MAX,
    MAX_ATTEMPTS_MIN,
    MAX_CONCURRENCY_KEY_LENGTH,
    MAX_ERROR_HISTORY,
    MAX_ERROR_LENGTH,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_NAME_LENGTH,
    MAX_OFFSET,
    NEW_JOB_CHANNEL,
    PRIORITY_MAX,
    PRIORITY_MIN,
    STATUSES,
    TERMINAL_STATUSES,
    BulkEnqueued,
    CancelOutcome,
    CancelResult,
    Completions,
    EnqueueResult,
    FailingKind,
    HeartbeatResult,
    IdempotencyConflict,
    InvalidJob,
    InvalidTransition,
    Job,
    JobNotFound,
    JobqError,
    JobSummary,
    Lease,
    MinuteCount,
    NewJob,
    Page,
    QueueLag,
    Rescued,
    SummaryPage,
    Unhandled,
    WorkerInfo,
)
from jobq.queue.validation import (
    check_idempotency_key,
    clamp_limit,
    encode_json,
    fingerprint,
    validate,
)

__all__ = [
    "CANCEL_CHANNEL",
    "DEFAULT_QUEUE",
    "JOB_EVENTS_CHANNEL",
    "LIST_LIMIT_DEFAULT",
    "LIST_LIMIT_MAX",
    "MAX_ATTEMPTS_MAX",
    "MAX_ATTEMPTS_MIN",
    "MAX_CONCURRENCY_KEY_LENGTH",
    "MAX_ERROR_HISTORY",
    "MAX_ERROR_LENGTH",
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "MAX_NAME_LENGTH",
    "MAX_OFFSET",
    "NEW_JOB_CHANNEL",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "STATUSES",
    "TERMINAL_STATUSES",
    "BulkEnqueued",
    "CancelOutcome",
    "CancelResult",
    "Completions",
    "Connection",
    "EnqueueResult",
    "FailingKind",
    "FlowState",
    "HeartbeatResult",
    "IdempotencyConflict",
    "InvalidJob",
    "InvalidTransition",
    "Job",
    "JobNotFound",
    "JobSummary",
    "JobqError",
    "Lease",
    "LimitUsage",
    "Limits",
    "MinuteCount",
    "NewJob",
    "Page",
    "Queue",
    "QueueInfo",
    "QueueLag",
    "Rescued",
    "SummaryPage",
    "TooManyPaused",
    "Unhandled",
    "WorkerInfo",
    "check_idempotency_key",
    "clamp_limit",
    "encode_json",
    "fingerprint",
    "lease_of",
    "parse_rate",
    "validate",
]  # fmt: skip
