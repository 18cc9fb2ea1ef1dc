"""jobq: a job queue for Python on PostgreSQL.

Names are imported when first used, so that `jobq.Client` (and `jobq.client`) can be used in
a process without the server's packages (asyncpg, FastAPI) installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobq.backoff import Backoff
    from jobq.client import AsyncClient, Client
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
    from jobq.registry import JobCancelled, JobContext, Registry, Snooze
    from jobq.worker import Worker

_WHERE = {
    "AsyncClient": "jobq.client",
    "Backoff": "jobq.backoff",
    "CancelOutcome": "jobq.queue",
    "Client": "jobq.client",
    "IdempotencyConflict": "jobq.queue",
    "InvalidJob": "jobq.queue",
    "InvalidTransition": "jobq.queue",
    "Job": "jobq.queue",
    "JobCancelled": "jobq.registry",
    "JobContext": "jobq.registry",
    "JobNotFound": "jobq.queue",
    "Middleware": "jobq.middleware",
    "NewJob": "jobq.queue",
    "Queue": "jobq.queue",
    "Registry": "jobq.registry",
    "Snooze": "jobq.registry",
    "Worker": "jobq.worker",
}

__all__ = [
    "AsyncClient",
    "Backoff",
    "CancelOutcome",
    "Client",
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
    "Snooze",
    "Worker",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'jobq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
