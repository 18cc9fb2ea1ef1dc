"""Producers on jobq's own pool: inserting jobs, alone or in bulk, with idempotency keys;
waking workers. The statements and the decisions around them are in `jobq.queue.inserts`,
shared with enqueue on a caller's connection (`jobq.txn`)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import timedelta

import asyncpg

from jobq.middleware import around_enqueue
from jobq.queue.base import Connection
from jobq.queue.inserts import (
    Row,
    Statement,
    enqueue_steps,
    insert_batch_steps,
    insert_job_rows_steps,
    jobs_from_rows,
    run_steps,
)
from jobq.queue.model import (
    NEW_JOB_CHANNEL,
    BulkEnqueued,
    EnqueueResult,
    InvalidJob,
    Job,
    NewJob,
    _FirstUse,
)
from jobq.queue.unique import Unique, UniqueSpec, unique_spec
from jobq.queue.validation import encode_json, validate, validate_each


def _held_by_version_3(exc: BaseException) -> bool:
    """A version 3 process inserted a job with this key in `jobs` meanwhile (its unique index
    on jobs.idempotency_key exists until the post-deploy migration): the key is held."""
    return (
        isinstance(exc, asyncpg.UniqueViolationError)
        and getattr(exc, "constraint_name", None) == "jobs_idempotency_key_idx"
    ) or isinstance(exc, asyncpg.DeadlockDetectedError)


class WakeUps:
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


class Enqueue(Unique):
    _wake_ups: WakeUps
    # Kinds every enqueue of which is unique unless it says otherwise (Queue(unique=...)).
    unique_defaults: dict[str, UniqueSpec]

    # -- producers ---------------------------------------------------------------------

    async def enqueue(
        self,
        new: NewJob,
        *,
        unique_for: timedelta | None = None,
        unique_by: Iterable[str] | None = None,
        unique_states: Iterable[str] | None = None,
    ) -> EnqueueResult:
        """Insert a job; with an idempotency key, return the existing job for the same request.

        Race-safe: concurrent inserts with one key wait on each other in the key table's
        primary key, and exactly one creates the job. A key is remembered for at least
        `idempotency_window` after its job's creation, and as long as the job exists.
        Goes through the enqueue middleware (`jobq.middleware`), if any.

        With `unique_for`, a unique job (`jobq.queue.unique`): while a job of the same kind,
        queue and `unique_by` payload fields (default: the whole payload) was enqueued within
        `unique_for` and is in one of `unique_states` (default UNIQUE_STATES), that job is
        returned (created False) and nothing is inserted.
        """
        spec = None
        if unique_for is not None or unique_by is not None or unique_states is not None:
            spec = unique_spec(unique_for, unique_by, unique_states)

        async def store(jobs: list[NewJob]) -> tuple[EnqueueResult, list[uuid.UUID]]:
            job = jobs[0]
            # The kind's own unique options, unless the call gives its own or an idempotency
            # key (which returns its job already).
            default = None if job.idempotency_key else self.unique_defaults.get(job.kind)
            result = await self._enqueue(job, spec or default)
            return result, [result.job.id]

        return await around_enqueue(self.middleware, [new], store)

    async def _enqueue(self, new: NewJob, spec: UniqueSpec | None = None) -> EnqueueResult:
        if spec is not None:
            job = validate(new)
            args = (job.kind, job.queue, encode_json("payload", job.payload), job.priority,
                    job.max_attempts, job.run_at, job.concurrency_key)  # fmt: skip
            return await self._enqueue_unique(job, args, spec)
        queue = new.queue  # checked by the steps, before any statement
        # The first insert of a debounce window carries the NOTIFY itself (see WakeUps).
        inline = self._wake_ups.claim_inline(queue)
        result = await run_steps(
            enqueue_steps(new, self.idempotency_window, notify=inline), self._fetch_one
        )
        if result.created and not inline:
            self._wake_ups.committed_quietly(queue)
        return result

    async def _fetch_one(self, statement: Statement) -> list[Row]:
        """A statement of a single enqueue, on the pool (each its own transaction)."""
        try:
            return list(await self.pool.fetch(statement.sql, *statement.args))
        except asyncpg.PostgresError as exc:
            if statement.keyed and _held_by_version_3(exc):
                return []  # the key is held: the next step reads it
            raise

    async def enqueue_many(
        self, jobs: Sequence[NewJob], *, connection: Connection | None = None
    ) -> list[uuid.UUID]:
        """Insert many jobs in one round trip; returns their ids in input order.

        Idempotency keys are honoured: a key that exists with the same request yields the
        existing id; with a different request the whole batch is rejected and nothing is stored.
        With `connection`, the insert joins that connection's open transaction.
        """
        if not jobs:
            return []

        async def store(changed: list[NewJob]) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
            ids = await self._enqueue_many(changed, connection)
            return ids, ids

        return await around_enqueue(self.middleware, jobs, store)

    def _not_unique(self, jobs: Sequence[NewJob]) -> None:
        """InvalidJob for a batch holding a kind whose every enqueue is unique: a batch is one
        insert statement, a unique job may need several (and transactions of its own)."""
        if not self.unique_defaults:
            return
        for i, job in enumerate(jobs):
            if job.kind in self.unique_defaults and job.idempotency_key is None:
                raise InvalidJob(
                    "unique_for",
                    f"jobs of kind {job.kind!r} are unique (its handler declares unique_for):"
                    f" enqueue them one at a time, not in a batch (job {i})",
                    index=i,
                )

    async def _enqueue_many(
        self, jobs: Sequence[NewJob], connection: Connection | None
    ) -> list[uuid.UUID]:
        checked = validate_each(jobs)
        self._not_unique(checked)
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
        if not jobs:
            return []

        async def store(changed: list[NewJob]) -> tuple[list[BulkEnqueued], list[uuid.UUID]]:
            stored = await self._enqueue_all(changed, batch_size, on_batch)
            return stored, [s.id for s in stored]

        return await around_enqueue(self.middleware, jobs, store)

    async def _enqueue_all(
        self,
        jobs: Sequence[NewJob],
        batch_size: int,
        on_batch: Callable[[int], None] | None,
    ) -> list[BulkEnqueued]:
        checked = validate_each(jobs)  # every job checked before the first insert
        self._not_unique(checked)
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
        conn: Connection,
        checked: Sequence[NewJob],
        offset: int,
        first_uses: dict[str, _FirstUse],
    ) -> list[BulkEnqueued]:
        """One round trip for `checked` (see `inserts.insert_batch_steps`), within the caller's
        transaction on `conn`."""
        steps = insert_batch_steps(
            checked, self.idempotency_window, offset=offset, first_uses=first_uses
        )
        return await run_steps(steps, lambda s: _fetch_in_savepoint(conn, s))

    async def enqueue_jobs(
        self,
        jobs: Sequence[NewJob],
        *,
        payloads: Sequence[str] | None = None,
        validated: bool = False,
    ) -> list[tuple[Job, bool]]:
        """Insert many jobs in one round trip and one transaction, all or none; returns each job
        whole, with whether this call created it (False: an idempotent replay), in input order.
        `payloads`: the jobs' payloads as `encode_json` made them, and `validated`: every job
        is what `validate` returned, when the caller has checked them itself. Goes through the
        enqueue middleware, if any (jobs a middleware changed are checked and encoded again)."""
        return jobs_from_rows(
            await self.enqueue_job_rows(jobs, payloads=payloads, validated=validated)
        )

    async def enqueue_job_rows(
        self,
        jobs: Sequence[NewJob],
        *,
        payloads: Sequence[str] | None = None,
        validated: bool = False,
    ) -> list[tuple[Row, bool]]:
        """As enqueue_jobs, each job as the row read back (jsonb as text; see
        `inserts.job_from_row`): for a caller that writes the jobs out again (POST
        /jobs/batch), 1,000 `Job`s built only to be taken apart cost more than the insert."""
        if not jobs:
            return []

        async def store(changed: list[NewJob]) -> tuple[list[tuple[Row, bool]], list[uuid.UUID]]:
            same = all(a is b for a, b in zip(changed, jobs, strict=True))
            stored = await self._enqueue_job_rows(
                changed, payloads if same else None, validated and same
            )
            return stored, [row["id"] for row, _ in stored]

        return await around_enqueue(self.middleware, jobs, store)

    async def _enqueue_job_rows(
        self, jobs: Sequence[NewJob], payloads: Sequence[str] | None, validated: bool
    ) -> list[tuple[Row, bool]]:
        checked = list(jobs) if validated else validate_each(jobs)
        self._not_unique(checked)
        steps = insert_job_rows_steps(checked, self.idempotency_window, payloads=payloads)
        async with self.pool.acquire() as conn:
            if all(j.idempotency_key is None for j in checked):
                # One statement, atomic by itself: one round trip, no BEGIN and COMMIT.
                return await run_steps(steps, lambda s: _fetch_in_savepoint(conn, s))
            # With keys a replay or a conflict is known only after the insert: a transaction.
            async with conn.transaction():
                return await run_steps(steps, lambda s: _fetch_in_savepoint(conn, s))

    @contextlib.asynccontextmanager
    async def _connection(self, conn: Connection | None) -> AsyncIterator[Connection]:
        if conn is not None:
            yield conn
            return
        async with self.pool.acquire() as acquired:
            yield acquired


async def _fetch_in_savepoint(conn: Connection, statement: Statement) -> list[Row]:
    if not statement.keyed:
        return list(await conn.fetch(statement.sql, *statement.args))
    for _ in range(3):
        try:
            # A savepoint: a key taken meanwhile by a version 3 process fails the statement,
            # not the caller's transaction; the statement is then run again.
            async with conn.transaction():
                return list(await conn.fetch(statement.sql, *statement.args))
        except asyncpg.PostgresError as exc:
            if not _held_by_version_3(exc):
                raise
    raise RuntimeError("bulk insert kept meeting keys of version 3")  # pragma: no cover
