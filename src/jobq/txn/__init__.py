"""Enqueue in the caller's own transaction, on the connection the application already uses.

    async with conn.transaction():                  # asyncpg
        await conn.execute("INSERT INTO orders ...")
        await jobq.txn.enqueue(conn, NewJob("email.send", {"order": 42}))

The job, and the NOTIFY that wakes workers, exist only if the caller's transaction commits: the
NOTIFY is part of the insert statement and PostgreSQL delivers it at commit, so an enqueue costs
one statement and no round trip of its own. A rollback (or a rollback to a savepoint taken
before) leaves nothing. Validation and idempotency keys are those of `Queue.enqueue`: the same
statements and decisions (`jobq.queue.inserts`).

Connections accepted (a driver is imported only when the caller uses it):

- async (`await enqueue(...)`, `await enqueue_many(...)`): an asyncpg connection (or one from
  an asyncpg pool), a psycopg 3 `AsyncConnection`, a SQLAlchemy `AsyncSession` or
  `AsyncConnection`;
- sync (`enqueue_sync(...)`, `enqueue_many_sync(...)`): a psycopg 3 `Connection`, a SQLAlchemy
  `Session` or `Connection`, Django's `django.db.connection` (or `connections[alias]`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from jobq.middleware import Middleware, around_enqueue, around_enqueue_sync, as_middleware
from jobq.queue.inserts import (
    Row,
    Statement,
    Steps,
    T,
    enqueue_steps,
    insert_batch_steps,
    run_steps,
    run_steps_sync,
)
from jobq.queue.model import BulkEnqueued, EnqueueResult, NewJob
from jobq.queue.validation import validate_changed, validate_each
from jobq.settings import idempotency_window_from_env
from jobq.txn import adapters

__all__ = ["enqueue", "enqueue_many", "enqueue_many_sync", "enqueue_sync"]


async def enqueue(
    conn: Any,
    job: NewJob,
    *,
    idempotency_window: timedelta | None = None,
    middleware: Sequence[Middleware] = (),
) -> EnqueueResult:
    """Insert one job in `conn`'s current transaction (see the module's docstring).

    With an idempotency key, the job stored before for the same request is returned
    (`created=False`), and a different request raises IdempotencyConflict, as `Queue.enqueue`
    does. `idempotency_window`: how long a key is remembered at least; default
    JOBQ_IDEMPOTENCY_WINDOW (24h). Goes through the process-wide enqueue middleware
    (`jobq.middleware.install`, e.g. jobq.otel), then `middleware` (e.g. a registry's,
    `registry.middleware`); the sync forms through their `enqueue_sync` hooks."""
    own = _own(middleware)
    window = _window(idempotency_window)

    async def store(jobs: list[NewJob]) -> tuple[EnqueueResult, list[uuid.UUID]]:
        result = await _run(conn, enqueue_steps(jobs[0], window))
        return result, [result.job.id]

    return await around_enqueue(own, [job], store)


async def enqueue_many(
    conn: Any,
    jobs: Sequence[NewJob],
    *,
    idempotency_window: timedelta | None = None,
    middleware: Sequence[Middleware] = (),
) -> list[BulkEnqueued]:
    """Insert many jobs in one statement in `conn`'s current transaction; each job's id and
    whether this call created it, in input order. Every job is validated before anything runs;
    an idempotency conflict raises IdempotencyConflict (roll back to drop the rest). Goes
    through the process-wide enqueue middleware and `middleware`, as `enqueue` does."""
    own = _own(middleware)
    checked = validate_each(jobs)
    if not checked:
        return []
    window = _window(idempotency_window)

    async def store(changed: list[NewJob]) -> tuple[list[BulkEnqueued], list[uuid.UUID]]:
        stored = await _run(conn, insert_batch_steps(validate_changed(changed, checked), window))
        return stored, [s.id for s in stored]

    return await around_enqueue(own, checked, store)


def enqueue_sync(
    conn: Any,
    job: NewJob,
    *,
    idempotency_window: timedelta | None = None,
    middleware: Sequence[Middleware] = (),
) -> EnqueueResult:
    """`enqueue` for sync drivers: psycopg `Connection`, SQLAlchemy `Session`/`Connection`,
    Django's connection. The process-wide enqueue middleware, then `middleware`, run through
    their `enqueue_sync` hooks; one with an async `enqueue` hook only is a TypeError, before
    any statement."""
    own = _own(middleware)
    window = _window(idempotency_window)
    fetch = adapters.sync(conn)

    def store(jobs: list[NewJob]) -> tuple[EnqueueResult, list[uuid.UUID]]:
        result = run_steps_sync(enqueue_steps(jobs[0], window), fetch)
        return result, [result.job.id]

    return around_enqueue_sync(own, [job], store)


def enqueue_many_sync(
    conn: Any,
    jobs: Sequence[NewJob],
    *,
    idempotency_window: timedelta | None = None,
    middleware: Sequence[Middleware] = (),
) -> list[BulkEnqueued]:
    """`enqueue_many` for sync drivers, through the middleware as `enqueue_sync` is."""
    own = _own(middleware)
    checked = validate_each(jobs)
    if not checked:
        return []
    window = _window(idempotency_window)
    fetch = adapters.sync(conn)

    def store(changed: list[NewJob]) -> tuple[list[BulkEnqueued], list[uuid.UUID]]:
        steps = insert_batch_steps(validate_changed(changed, checked), window)
        stored = run_steps_sync(steps, fetch)
        return stored, [s.id for s in stored]

    return around_enqueue_sync(own, checked, store)


async def _run(conn: Any, steps: Steps[T]) -> T:
    fetch = adapters.asynchronous(conn)
    return await run_steps(steps, fetch)


def _own(middleware: Sequence[Middleware]) -> tuple[Middleware, ...]:
    return tuple(as_middleware(m) for m in middleware)


def _window(window: timedelta | None) -> timedelta:
    return idempotency_window_from_env() if window is None else window


# Re-exported for adapters written outside jobq.
__all__ += ["Row", "Statement"]
