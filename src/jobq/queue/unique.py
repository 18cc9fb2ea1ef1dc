"""Unique jobs: an enqueue that returns the existing job for a duplicate within a period.

A unique job's key (`unique_key`: kind, queue and the payload fields it is unique by) is a
row of `jobq_unique_keys` naming the job that holds it until `expires_at` (enqueue time +
`unique_for`). A duplicate is an enqueue of the same key while the key has not expired and
its job is in one of the enqueue's `unique_states` (live or in history); it creates nothing
and returns that job.

- First use of a key: one statement inserts the key row and the job together; concurrent
  enqueues of one key wait on each other in the key's primary key index and exactly one
  inserts (the others insert nothing).
- A key that is held: a fresh statement (which sees the holder, committed) reads the key and
  its job: a duplicate when it counts.
- A key that expired, or whose job no longer counts (failed, cancelled, removed): taken over
  in a transaction that locks the key row first, then reads the holder's state with a fresh
  snapshot, so two racing take-overs are serialised and the second sees the first's job.
  (Deciding in `ON CONFLICT ... DO UPDATE WHERE` would not do: its subqueries read the
  statement's snapshot, which may predate a concurrent take-over's job.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import orjson

from jobq.queue.base import Connection
from jobq.queue.inserts import _WAKING, _derived_key, _trace_json
from jobq.queue.lookup import Lookup, finished_not_before
from jobq.queue.model import (
    _JOB_COLUMNS,
    MAX_NAME_LENGTH,
    STATUSES,
    EnqueueResult,
    InvalidJob,
    Job,
    JobNotFound,
    NewJob,
)

# Which states of an earlier job make a new one a duplicate, when not said: waiting (queued,
# including a run_at in the future; retrying), running, or done. A job that failed for good
# or was cancelled does not hold its key: enqueueing it again is how one tries again.
UNIQUE_STATES = frozenset({"queued", "running", "retrying", "succeeded"})
MAX_UNIQUE_FOR = timedelta(days=366)
MAX_UNIQUE_BY = 32


@dataclass(frozen=True, slots=True)
class UniqueSpec:
    """What makes an enqueue unique: checked options of `Queue.enqueue`."""

    period: timedelta
    by: tuple[str, ...] | None  # payload fields; None: the whole payload
    states: frozenset[str]


def unique_spec(
    unique_for: timedelta | None,
    unique_by: Iterable[str] | None,
    unique_states: Iterable[str] | None,
) -> UniqueSpec:
    """The options checked, or InvalidJob."""
    if unique_for is None:
        raise InvalidJob("unique_for", "is required with unique_by or unique_states")
    if not isinstance(unique_for, timedelta) or not timedelta(0) < unique_for <= MAX_UNIQUE_FOR:
        raise InvalidJob("unique_for", f"must be a duration over 0 and at most {MAX_UNIQUE_FOR}")
    by = None if unique_by is None else _names("unique_by", unique_by)
    if by is not None and len(by) > MAX_UNIQUE_BY:
        raise InvalidJob("unique_by", f"must name at most {MAX_UNIQUE_BY} payload fields")
    states = UNIQUE_STATES
    if unique_states is not None:
        states = frozenset(_names("unique_states", unique_states))
        unknown = sorted(states - set(STATUSES))
        if unknown or not states:
            raise InvalidJob(
                "unique_states", f"must be some of {', '.join(STATUSES)}; got {unknown or 'none'}"
            )
    return UniqueSpec(unique_for, by, states)


def _names(field: str, values: Iterable[object]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise InvalidJob(field, "must be a list of names, not one string")
    out: list[str] = []
    for v in values:
        if not isinstance(v, str) or not v or len(v) > MAX_NAME_LENGTH:
            raise InvalidJob(field, f"must be names of 1 to {MAX_NAME_LENGTH} characters")
        out.append(v)
    return tuple(dict.fromkeys(out))


def unique_key(job: NewJob, spec: UniqueSpec) -> str:
    """The key unique jobs share: kind, queue and the payload's `unique_by` fields (a field
    the payload lacks counts as null), or the whole payload when unique_by is None."""
    part: Any = job.payload
    # The fields named in any order are the same fields; values the database holds as equal
    # JSON (1 and 1.0) are the same values.
    by = None if spec.by is None else sorted(spec.by)
    if by is not None:
        part = {name: job.payload.get(name) for name in by}
    canonical = orjson.dumps(
        {"kind": job.kind, "queue": job.queue, "by": by, "payload": _same_numbers(part)},
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


def _same_numbers(value: Any) -> Any:
    """The value with each integral float written as the integer jsonb takes it for."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _same_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_same_numbers(v) for v in value]
    return value


_COLUMNS = "kind, queue, payload, priority, max_attempts, run_at, concurrency_key, trace_context"
_VALUES = (
    "$1, $2, $3::text::jsonb, $4, $5, coalesce($6, now()), "
    + _derived_key("$7::text", "$3::text::json", "$1", "$2", "jobq_flow_controls")
    + ", $10::text::jsonb"
)

_FIRST = f"""
WITH firsts AS (
    SELECT $8::text AS key, jobq_uuid_v7() AS job_id
), taken AS (
    INSERT INTO jobq_unique_keys (key, job_id, expires_at)
    SELECT key, job_id, now() + $9::interval FROM firsts
    ON CONFLICT (key) DO NOTHING
    RETURNING key
), ins AS (
    INSERT INTO jobs (id, {_COLUMNS})
    SELECT firsts.job_id, {_VALUES} FROM firsts JOIN taken USING (key)
    RETURNING {_JOB_COLUMNS}
)
{_WAKING}
"""

_HOLDER = "SELECT job_id, expires_at > now() AS live FROM jobq_unique_keys WHERE key = $1"
_HOLDER_LOCKED = _HOLDER + " FOR UPDATE"

_STATUS = """
SELECT status FROM jobs WHERE id = $1
UNION ALL
SELECT status FROM jobs_history WHERE id = $1 AND finished_at >= $2
LIMIT 1
"""

_TAKE_OVER = f"""
WITH taken AS (
    UPDATE jobq_unique_keys
    SET job_id = jobq_uuid_v7(), created_at = now(), expires_at = now() + $9::interval
    WHERE key = $8
    RETURNING job_id
), ins AS (
    INSERT INTO jobs (id, {_COLUMNS})
    SELECT taken.job_id, {_VALUES} FROM taken
    RETURNING {_JOB_COLUMNS}
)
{_WAKING}
"""


async def binding_status(conn: Connection, held: Any, spec: UniqueSpec) -> str | None:
    """The status of the job holding a unique key (its `_HOLDER` row) while the key still
    binds: within its period, its job in one of the states that make a duplicate; else None
    (the key may be taken over)."""
    if held is None or not held["live"]:
        return None
    status = await conn.fetchval(_STATUS, held["job_id"], finished_not_before(held["job_id"]))
    return status if status in spec.states else None


# Keys past their period, a batch at a time (the cleaner's pass). The holder's state does not
# matter any more: an expired key is taken over by the next enqueue anyway.
_EXPIRE = """
DELETE FROM jobq_unique_keys
WHERE key IN (SELECT key FROM jobq_unique_keys WHERE expires_at <= now() LIMIT $1)
"""


class Unique(Lookup):
    async def expire_unique_keys(self, limit: int = 10_000) -> int:
        """Delete up to `limit` unique keys whose period has passed; how many."""
        status = await self.pool.execute(_EXPIRE, limit)
        return int(status.split()[-1])

    async def _enqueue_unique(
        self, job: NewJob, args: tuple[object, ...], spec: UniqueSpec
    ) -> EnqueueResult:
        """`job` (validated); `args` the insert's first seven parameters (kind, queue,
        payload, priority, max_attempts, run_at, concurrency_key)."""
        if job.idempotency_key is not None:
            raise InvalidJob(
                "unique_for",
                "cannot be combined with an idempotency key: a key already returns its job",
            )
        key = unique_key(job, spec)
        params = (*args, key, spec.period, _trace_json(job))
        for _ in range(5):
            row = await self.pool.fetchrow(_FIRST, *params)
            if row is not None:
                return EnqueueResult(Job.from_record(row), created=True)
            held = await self.pool.fetchrow(_HOLDER, key)
            if held is None:
                continue  # expired and deleted in between: take it again
            if held["live"]:
                existing = await self._holder(held["job_id"])
                if existing is not None and existing.status in spec.states:
                    return EnqueueResult(existing, created=False)
            async with self.pool.acquire() as conn, conn.transaction():
                locked = await conn.fetchrow(_HOLDER_LOCKED, key)
                if locked is None:
                    continue
                if await binding_status(conn, locked, spec) is None:
                    row = await conn.fetchrow(_TAKE_OVER, *params)
                    assert row is not None  # the key row is locked by this transaction
                    return EnqueueResult(Job.from_record(row), created=True)
            # Taken over by another enqueue meanwhile: its job is the duplicate's.
            existing = await self._holder(locked["job_id"])
            if existing is not None:
                return EnqueueResult(existing, created=False)
        raise RuntimeError("unique insert did not settle")  # pragma: no cover

    async def _holder(self, job_id: object) -> Job | None:
        try:
            return await self.get(job_id)  # type: ignore[arg-type]
        except JobNotFound:
            return None
