"""jobq: a job queue for Python on PostgreSQL."""

from jobq.backoff import Backoff
from jobq.middleware import Middleware
from jobq.queue import (
    CancelOutcome,
    IdempotencyConflict,
    InvalidJob,
    InvalidTransition,
    Job,
    JobNotFound,
    NewJob,
    Queue,
)
from jobq.registry import JobCancelled, JobContext, Registry
from jobq.worker import Worker

__all__ = [
    "Backoff",
    "CancelOutcome",
    "IdempotencyConflict",
    "InvalidJob",
    "InvalidTransition",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobNotFound",
    "Middleware",
    "NewJob",
    "Queue",
    "Registry",
    "Worker",
]
