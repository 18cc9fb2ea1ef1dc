"""Producers: inserting jobs, alone or in bulk, with idempotency keys; waking workers."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import asyncpg

from jobq.queue.base import Connection, QueueBase
from jobq.queue.model import (
    _JOB_COLUMNS,
    NEW_JOB_CHANNEL,
    BulkEnqueued,
    EnqueueResult,
    IdempotencyConflict,
    Job,
    NewJob,
    _FirstUse,
)
from jobq.queue.validation import encode_json, fingerprint, validate

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


class Enqueue(QueueBase):
    _wake_ups: WakeUps

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
        self, jobs: Sequence[NewJob], *, connection: Connection | None = None
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
    async def _connection(self, conn: Connection | None) -> AsyncIterator[Connection]:
        if conn is not None:
            yield conn
            return
        async with self.pool.acquire() as acquired:
            yield acquired
