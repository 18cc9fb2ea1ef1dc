"""Producers: inserting jobs, alone or in bulk, with idempotency keys; waking workers."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import asyncpg

from jobq.middleware import around_enqueue, enqueue_chain
from jobq.queue.base import Connection
from jobq.queue.lookup import Lookup
from jobq.queue.model import (
    _JOB_COLUMNS,
    NEW_JOB_CHANNEL,
    BulkEnqueued,
    EnqueueResult,
    IdempotencyConflict,
    Job,
    JobNotFound,
    NewJob,
    _FirstUse,
)
from jobq.queue.validation import encode_json, fingerprint, validate

_INSERT_COLUMNS = """kind, queue, payload, priority, max_attempts, run_at, idempotency_key,
                  request_fingerprint, concurrency_key"""
# What an insert of one job returns: the job; or the job and the NOTIFY that wakes workers
# when it commits.
_QUIET = "SELECT * FROM ins"
_WAKING = f"SELECT ins.*, pg_notify('{NEW_JOB_CHANNEL}', queue)::text AS _notified FROM ins"

_INSERT_UNKEYED_QUIET = f"""
INSERT INTO jobs (id, {_INSERT_COLUMNS})
VALUES (jobq_uuid_v7(), $1, $2, $3::text::jsonb, $4, $5, coalesce($6, now()), NULL, NULL, $7)
RETURNING {_JOB_COLUMNS}
"""
_INSERT_UNKEYED = f"WITH ins AS ({_INSERT_UNKEYED_QUIET}) {_WAKING}"

# A key is taken by inserting its row; the job is inserted in the same statement, only when
# the key was taken. Concurrent inserts of one key wait on each other in the key's primary
# key index: exactly one inserts. A key is taken over only once it has expired and its job no
# longer exists anywhere; the first of concurrent takers locks the key row and renews it, the
# others then re-check the renewed row, which no longer qualifies (docs/storage.md).
_TAKE_KEYS = """
    INSERT INTO jobq_idempotency_keys AS held (key, job_id, fingerprint, expires_at)
    SELECT key, job_id, fingerprint, now() + $9::interval FROM firsts
    ON CONFLICT (key) DO UPDATE
        SET job_id = excluded.job_id, fingerprint = excluded.fingerprint, created_at = now(),
            expires_at = excluded.expires_at
        WHERE held.expires_at <= now()
          AND NOT EXISTS (SELECT FROM jobs WHERE id = held.job_id)
          AND NOT EXISTS (SELECT FROM jobs_history WHERE id = held.job_id)
    RETURNING key
"""

_KEYED = f"""
WITH firsts AS (
    SELECT $7::text AS key, jobq_uuid_v7() AS job_id, $8::text AS fingerprint
), taken AS ({_TAKE_KEYS}), ins AS (
    INSERT INTO jobs (id, {_INSERT_COLUMNS})
    SELECT firsts.job_id, $1, $2, $3::text::jsonb, $4, $5, coalesce($6, now()), $7, $8, $10
    FROM firsts JOIN taken USING (key)
    RETURNING {_JOB_COLUMNS}
)
"""

_INSERT_KEYED_QUIET = _KEYED + _QUIET
_INSERT_KEYED = _KEYED + _WAKING

_SELECT_KEY = "SELECT job_id, fingerprint FROM jobq_idempotency_keys WHERE key = $1"
_SELECT_KEYS = (
    "SELECT key, job_id, fingerprint FROM jobq_idempotency_keys WHERE key = ANY($1::text[])"
)

# Many jobs in one statement, in input order. A key's first use in the input takes the key (and
# creates its job, when taken); its later uses and keys held already create nothing.
_INSERT_MANY = f"""
WITH input AS (
    -- Ids drawn here, row by row in input order, so that they sort as the input does.
    SELECT t.*, jobq_uuid_v7() AS id
    FROM unnest($1::text[], $2::text[], $3::text[], $4::smallint[], $5::int[],
                $6::timestamptz[], $7::text[], $8::text[], $10::text[])
         WITH ORDINALITY AS t(k, q, p, pr, ma, ra, ik, fp, ck, n)
), firsts AS (
    SELECT DISTINCT ON (ik) ik AS key, n, id AS job_id, fp AS fingerprint
    FROM input WHERE ik IS NOT NULL
    ORDER BY ik, n
), taken AS ({_TAKE_KEYS}), ins AS (
    INSERT INTO jobs (id, {_INSERT_COLUMNS})
    SELECT i.id, i.k, i.q, i.p::jsonb, i.pr, i.ma,
           coalesce(i.ra, now()), i.ik, i.fp, i.ck
    FROM input AS i LEFT JOIN firsts AS f ON f.n = i.n
    WHERE i.ik IS NULL OR f.key IN (SELECT key FROM taken)
    ORDER BY i.n
    RETURNING id, queue, idempotency_key
), notified AS (
    SELECT pg_notify('{NEW_JOB_CHANNEL}', q) FROM (SELECT DISTINCT queue AS q FROM ins) AS qs
)
SELECT id, idempotency_key, (SELECT count(*) FROM notified) AS _n FROM ins
"""


# The same without keys: no key to take, so no join to make.
_INSERT_MANY_UNKEYED = f"""
WITH ins AS (
    INSERT INTO jobs (id, {_INSERT_COLUMNS})
    SELECT jobq_uuid_v7(), k, q, p::jsonb, pr, ma, coalesce(ra, now()), NULL, NULL, ck
    FROM unnest($1::text[], $2::text[], $3::text[], $4::smallint[], $5::int[],
                $6::timestamptz[], $7::text[]) AS t(k, q, p, pr, ma, ra, ck)
    RETURNING id, queue, idempotency_key
), notified AS (
    SELECT pg_notify('{NEW_JOB_CHANNEL}', q) FROM (SELECT DISTINCT queue AS q FROM ins) AS qs
)
SELECT id, idempotency_key, (SELECT count(*) FROM notified) AS _n FROM ins
"""


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


class Enqueue(Lookup):
    _wake_ups: WakeUps

    # -- producers ---------------------------------------------------------------------

    async def enqueue(self, new: NewJob) -> EnqueueResult:
        """Insert a job; with an idempotency key, return the existing job for the same request.

        Race-safe: concurrent inserts with one key wait on each other in the key table's
        primary key, and exactly one creates the job. A key is remembered for at least
        `idempotency_window` after its job's creation, and as long as the job exists.
        Goes through the enqueue middleware (`jobq.middleware`), if any.
        """
        chain = enqueue_chain(self.middleware)
        if chain is None:
            return await self._enqueue(new)

        async def store(jobs: list[NewJob]) -> tuple[EnqueueResult, list[uuid.UUID]]:
            result = await self._enqueue(jobs[0])
            return result, [result.job.id]

        return await around_enqueue(chain, [new], store)

    async def _enqueue(self, new: NewJob) -> EnqueueResult:
        job = validate(new)
        payload = encode_json("payload", job.payload)
        args: tuple[object, ...] = (
            job.kind,
            job.queue,
            payload,
            job.priority,
            job.max_attempts,
            job.run_at,
        )
        key = job.idempotency_key
        if key is None:
            row = await self._insert_one(
                _INSERT_UNKEYED, _INSERT_UNKEYED_QUIET, job.queue, (*args, job.concurrency_key)
            )
            assert row is not None
            return EnqueueResult(Job.from_record(row), created=True)
        fp = fingerprint(job)
        for _ in range(3):
            try:
                row = await self._insert_one(
                    _INSERT_KEYED,
                    _INSERT_KEYED_QUIET,
                    job.queue,
                    (*args, key, fp, self.idempotency_window, job.concurrency_key),
                )
            except asyncpg.PostgresError as exc:
                if not _held_by_version_3(exc):
                    raise
                row = None
            if row is not None:
                return EnqueueResult(Job.from_record(row), created=True)
            # The key is held. A fresh statement sees the committed key row.
            held = await self.pool.fetchrow(_SELECT_KEY, key)
            if held is None:
                continue  # released in between: try to take it again
            if held["fingerprint"] != fp:
                raise IdempotencyConflict(key, held["job_id"])
            try:
                return EnqueueResult(await self.get(held["job_id"]), created=False)
            except JobNotFound:
                raise IdempotencyConflict(key, held["job_id"], gone=True) from None
        raise RuntimeError("idempotent insert did not settle")  # pragma: no cover

    async def _insert_one(
        self, waking: str, quiet: str, queue: str, args: tuple[object, ...]
    ) -> asyncpg.Record | None:
        """One insert, carrying the NOTIFY itself when the debounce window says so."""
        inline = self._wake_ups.claim_inline(queue)
        row = await self.pool.fetchrow(waking if inline else quiet, *args)
        if row is not None and not inline:
            self._wake_ups.committed_quietly(queue)
        return row

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
        chain = enqueue_chain(self.middleware)
        if chain is None:
            return await self._enqueue_many(jobs, connection)

        async def store(changed: list[NewJob]) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
            ids = await self._enqueue_many(changed, connection)
            return ids, ids

        return await around_enqueue(chain, jobs, store)

    async def _enqueue_many(
        self, jobs: Sequence[NewJob], connection: Connection | None
    ) -> list[uuid.UUID]:
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
        chain = enqueue_chain(self.middleware) if jobs else None
        if chain is None:
            return await self._enqueue_all(jobs, batch_size, on_batch)

        async def store(changed: list[NewJob]) -> tuple[list[BulkEnqueued], list[uuid.UUID]]:
            stored = await self._enqueue_all(changed, batch_size, on_batch)
            return stored, [s.id for s in stored]

        return await around_enqueue(chain, jobs, store)

    async def _enqueue_all(
        self,
        jobs: Sequence[NewJob],
        batch_size: int,
        on_batch: Callable[[int], None] | None,
    ) -> list[BulkEnqueued]:
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
        conn: Connection,
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
        rows = await self._insert_rows(conn, checked, payloads, fps)
        if all(j.idempotency_key is None for j in checked):
            return [BulkEnqueued(r["id"], True) for r in rows]
        created = {r["idempotency_key"]: r["id"] for r in rows if r["idempotency_key"] is not None}
        unkeyed = iter([r["id"] for r in rows if r["idempotency_key"] is None])
        firsts: dict[str, int] = {}  # key: position in `checked` of its first use
        for i, j in enumerate(checked):
            if j.idempotency_key is not None:
                firsts.setdefault(j.idempotency_key, i)
        for _ in range(3):
            missing = [k for k in firsts if k not in created and k not in first_uses]
            if not missing:
                break
            for r in await conn.fetch(_SELECT_KEYS, missing):
                first_uses[r["key"]] = _FirstUse(r["job_id"], r["fingerprint"], index=None)
            # Keys released between the insert and the read: their first uses try again.
            again = [firsts[k] for k in missing if k not in first_uses]
            if again:
                retried = await self._insert_rows(
                    conn, [checked[i] for i in again], [payloads[i] for i in again],
                    [fps[i] for i in again],
                )  # fmt: skip
                created.update((r["idempotency_key"], r["id"]) for r in retried)
        else:  # pragma: no cover
            raise RuntimeError("idempotent insert did not settle")
        out: list[BulkEnqueued] = []
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

    async def _insert_rows(
        self,
        conn: Connection,
        jobs: Sequence[NewJob],
        payloads: Sequence[str],
        fps: Sequence[str | None],
    ) -> list[asyncpg.Record]:
        args: tuple[object, ...] = (
            [j.kind for j in jobs],
            [j.queue for j in jobs],
            payloads,
            [j.priority for j in jobs],
            [j.max_attempts for j in jobs],
            [j.run_at for j in jobs],
        )
        concurrency_keys = [j.concurrency_key for j in jobs]
        if all(fp is None for fp in fps):  # no key: nothing a version 3 process can hold
            return list(await conn.fetch(_INSERT_MANY_UNKEYED, *args, concurrency_keys))
        args += ([j.idempotency_key for j in jobs], fps, self.idempotency_window, concurrency_keys)
        for _ in range(3):
            try:
                # A savepoint: a key taken meanwhile by a version 3 process fails the statement,
                # not the caller's transaction; the statement is then run again.
                async with conn.transaction():
                    return list(await conn.fetch(_INSERT_MANY, *args))
            except asyncpg.PostgresError as exc:
                if not _held_by_version_3(exc):
                    raise
        raise RuntimeError("bulk insert kept meeting keys of version 3")  # pragma: no cover

    @contextlib.asynccontextmanager
    async def _connection(self, conn: Connection | None) -> AsyncIterator[Connection]:
        if conn is not None:
            yield conn
            return
        async with self.pool.acquire() as acquired:
            yield acquired
