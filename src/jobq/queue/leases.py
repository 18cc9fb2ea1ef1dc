"""What workers do with a job: claim, complete, fail, snooze, release, heartbeat, rescue.

Every statement here is fenced by the lease token the claim handed out (the lifecycle is drawn
in `jobq.queue`): once a job was rescued, cancelled or finished elsewhere, a late answer from
the old run changes nothing. A statement that ends a job moves it to `jobs_history` in the
same statement.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import asyncpg

from jobq.backoff import Backoff
from jobq.queue.base import Connection, QueueBase
from jobq.queue.model import (
    _JOB_FIELDS,
    MAX_ERROR_HISTORY,
    MAX_ERROR_LENGTH,
    NEW_JOB_CHANNEL,
    Completions,
    HeartbeatResult,
    InvalidJob,
    Job,
    Lease,
    Rescued,
    into_history,
    notify_watchers,
)
from jobq.queue.validation import encode_json


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


def _append_error(errors: str, attempt: str, error: str) -> str:
    """SQL: `errors` with one entry appended, keeping the latest MAX_ERROR_HISTORY entries."""
    return (
        f"jsonb_path_query_array({errors} || jsonb_build_array(jsonb_build_object("
        f"'attempt', {attempt}, 'error', {error}, 'at', now())),"
        f" '$[last - {MAX_ERROR_HISTORY - 1} to last]')"
    )


# What a claim hands the worker: every column but the large ones it never reads (the error
# history, last_error, the result), which come back empty.
_CLAIM_RETURNING = ", ".join(
    {"errors": "'[]'::jsonb AS errors", "last_error": "NULL::text AS last_error",
     "result": "NULL::jsonb AS result"}.get(f, "j." + f)
    for f in _JOB_FIELDS
)  # fmt: skip

# What a claim writes on each job it takes (every claim statement: plain and limited): the
# attempt, max_attempts left unspecified resolved ($6, $7, $8), a fresh lease for $1 of $5 s.
_LEASE = """status = 'running',
    attempts = j.attempts + 1,
    max_attempts = coalesce(
        j.max_attempts,
        (SELECT m.n FROM unnest($6::text[], $7::int[]) AS m(kind, n) WHERE m.kind = j.kind),
        $8),
    started_at = now(),
    updated_at = now(),
    lease_owner = $1,
    lease_token = gen_random_uuid(),
    lease_expires_at = now() + make_interval(secs => $5)"""

# A paused or limited queue or kind ({scope}, {name}): a row of jobq_flow_controls says so.
_HELD = """SELECT 1 FROM jobq_flow_controls AS c
           WHERE c.scope = '{scope}' AND c.name = {name}
             AND (c.paused_at IS NOT NULL OR c.limited)"""

# One statement: pick due jobs in claim order, skipping rows other workers hold, and lease them.
# Bounded by jobs_queue_claim_idx (queue, priority, run_at, id): a loose index scan finds the
# (queue, priority) pairs that have waiting jobs, one index probe each; per pair, only due rows
# are read, in (run_at, id) order. Another queue's backlog and future-dated jobs cost nothing.
# Priorities are taken one at a time, lowest first, and the walk stops once $4 rows are held:
# a row locked costs a write, so a claim locks the rows it takes and, at the last priority it
# reaches, at most $4 per queue; not $4 for every priority waiting.
# max_attempts left unspecified (NULL) becomes the claiming worker's value for the kind ($6,
# $7), or $8.
# Paused queues and kinds are left out, and so are limited ones, which only the limited claim
# (jobq.queue.flow) takes: one primary-key probe of jobq_flow_controls per queue and kind
# named, a table of a few rows that no claim writes. A pause committed is seen by the next
# claim of every worker, on any host and through any pooler.
_CLAIM = f"""
WITH RECURSIVE open_queues AS (
    SELECT q.queue FROM unnest($3::text[]) AS q(queue)
    WHERE NOT EXISTS ({_HELD.format(scope="queue", name="q.queue")})
), open_kinds AS (
    SELECT array_agg(k.kind) AS kinds FROM unnest($2::text[]) AS k(kind)
    WHERE NOT EXISTS ({_HELD.format(scope="kind", name="k.kind")})
), pairs AS (
    (SELECT q.queue, p.priority
     FROM open_queues AS q
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
              AND kind = ANY((SELECT kinds FROM open_kinds)::text[])
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
SET {_LEASE}
FROM picked
WHERE j.id = picked.id
RETURNING {_CLAIM_RETURNING}
"""

# A run that succeeded leaves the live table for history in one statement, fenced as every
# write of a worker is (id + lease token + running). Callers pass the ids sorted, so that two
# statements over the same rows (a completion and a heartbeat) lock them in the same order:
# they deadlocked on PostgreSQL 15 when they did not (docs/storage.md).
_COMPLETE_MANY = f"""
WITH done AS (
    DELETE FROM jobs AS j
    USING unnest($1::uuid[], $2::uuid[], $3::text[]) AS r(id, token, result)
    WHERE j.id = r.id AND j.lease_token = r.token AND j.status = 'running'
    RETURNING j.*, r.result AS new_result, {notify_watchers("j")}
)
{into_history("done", status="'succeeded'", result="done.new_result::jsonb", finished_at="now()")}
RETURNING id
"""

# A failed attempt retries only when attempts are left and nobody asked to cancel: after a
# cancel request (202) a failing or timed-out attempt ends the job cancelled. A retry stays in
# `jobs` (updated in place); an end moves the job to history. Which one is decided on the row
# as locked by `cur`, after any cancel request that committed while this statement waited for
# it: deciding in the UPDATE's and the DELETE's own WHERE would read the row as of the
# statement's start in one of them, and a concurrent cancel could then make neither match.
_FAIL = f"""
WITH cur AS (
    SELECT id, (NOT $5 AND NOT cancel_requested
                AND coalesce(attempts < max_attempts, false)) AS retries
    FROM jobs
    WHERE id = $1 AND lease_token = $2 AND status = 'running'
    FOR UPDATE
), retried AS (
    UPDATE jobs AS j
    SET status = 'retrying',
        run_at = now() + make_interval(secs => $4),
        retry_delay_seconds = $4,
        finished_at = NULL,
        last_error = $3,
        errors = {_append_error("j.errors", "j.attempts", "$3::text")},
        updated_at = now(),
        lease_token = NULL,
        lease_expires_at = NULL
    FROM cur
    WHERE j.id = cur.id AND cur.retries
    RETURNING j.status
), ended AS (
    DELETE FROM jobs AS j USING cur WHERE j.id = cur.id AND NOT cur.retries
    RETURNING j.*, {notify_watchers("j")}
), moved AS (
    {
    into_history(
        "ended",
        status="CASE WHEN ended.cancel_requested THEN 'cancelled' ELSE 'failed_permanent' END",
        last_error="$3",
        errors=_append_error("ended.errors", "ended.attempts", "$3::text"),
        finished_at="now()",
    )
}
    RETURNING status
)
SELECT status FROM retried UNION ALL SELECT status FROM moved
"""

_CANCELLED_BY_WORKER = f"""
WITH ended AS (
    DELETE FROM jobs WHERE id = $1 AND lease_token = $2 AND status = 'running'
    RETURNING *, {notify_watchers("jobs")}
)
{
    into_history(
        "ended",
        status="'cancelled'",
        last_error="$3",
        errors=_append_error("ended.errors", "ended.attempts", "$3::text"),
        finished_at="now()",
    )
}
RETURNING status
"""

# Graceful shutdown: the interrupted run does not count as an attempt, and the job waits again;
# one whose cancel was requested ends cancelled instead (decided on the locked row, see _FAIL).
_RELEASE = f"""
WITH cur AS (
    SELECT j.id, j.cancel_requested AS cancelled
    FROM jobs AS j
    JOIN unnest($1::uuid[], $2::uuid[]) AS r(id, token) ON j.id = r.id AND j.lease_token = r.token
    WHERE j.status = 'running'
    ORDER BY j.id
    FOR UPDATE OF j
), released AS (
    UPDATE jobs AS j
    SET status = CASE WHEN j.attempts <= 1 THEN 'queued' ELSE 'retrying' END,
        attempts = j.attempts - 1,
        finished_at = NULL,
        started_at = NULL,
        run_at = now(),
        updated_at = now(),
        lease_owner = NULL,
        lease_token = NULL,
        lease_expires_at = NULL
    FROM cur
    WHERE j.id = cur.id AND NOT cur.cancelled
    RETURNING j.id, j.queue, j.status
), ended AS (
    DELETE FROM jobs AS j USING cur WHERE j.id = cur.id AND cur.cancelled
    RETURNING j.*, {notify_watchers("j")}
), moved AS (
    {into_history("ended", status="'cancelled'", lease_owner="NULL", finished_at="now()")}
    RETURNING id, queue, status
)
SELECT id, queue, status FROM released UNION ALL SELECT id, queue, status FROM moved
"""

# A handler asked to run again later (`Snooze`): the attempt the claim counted is given back
# (attempts - 1, so max_attempts is not consumed), the job waits until now() + $3 seconds and
# its lease is released. As at release, it waits as `queued` when no attempt is left counted,
# else as `retrying` (it failed before); one whose cancel was requested ends cancelled instead
# (decided on the locked row, see _FAIL).
_SNOOZE = f"""
WITH cur AS (
    SELECT id, cancel_requested AS cancelled
    FROM jobs
    WHERE id = $1 AND lease_token = $2 AND status = 'running'
    FOR UPDATE
), snoozed AS (
    UPDATE jobs AS j
    SET status = CASE WHEN j.attempts <= 1 THEN 'queued' ELSE 'retrying' END,
        attempts = j.attempts - 1,
        run_at = now() + make_interval(secs => $3),
        finished_at = NULL,
        started_at = NULL,
        updated_at = now(),
        lease_owner = NULL,
        lease_token = NULL,
        lease_expires_at = NULL
    FROM cur
    WHERE j.id = cur.id AND NOT cur.cancelled
    RETURNING j.status
), ended AS (
    DELETE FROM jobs AS j USING cur WHERE j.id = cur.id AND cur.cancelled
    RETURNING j.*, {notify_watchers("j")}
), moved AS (
    {into_history("ended", status="'cancelled'", lease_owner="NULL", finished_at="now()")}
    RETURNING status
)
SELECT status FROM snoozed UNION ALL SELECT status FROM moved
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
    ORDER BY j.id
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
_LOST_ERROR = "'worker lost: lease held by ' || coalesce(j.lease_owner, '?') || ' expired'"
_RESCUE = f"""
WITH lost AS (
    SELECT j.id,
           NOT j.cancel_requested AND coalesce(j.attempts < j.max_attempts, false) AS retries,
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
), retried AS (
    UPDATE jobs AS j
    SET status = 'retrying',
        last_error = 'worker lost: lease held by ' || coalesce(j.lease_owner, '?')
                     || ' expired at ' || j.lease_expires_at::text,
        errors = {_append_error("j.errors", "j.attempts", _LOST_ERROR)},
        run_at = now() + make_interval(secs => lost.delay),
        retry_delay_seconds = lost.delay,
        finished_at = NULL,
        updated_at = now(),
        lease_token = NULL,
        lease_expires_at = NULL
    FROM lost
    WHERE j.id = lost.id AND lost.retries
    RETURNING j.id, j.kind, j.status, j.queue
), ended AS (
    DELETE FROM jobs AS j USING lost WHERE j.id = lost.id AND NOT lost.retries
    RETURNING j.*, {notify_watchers("j")}
), moved AS (
    {
    into_history(
        "ended",
        status="CASE WHEN ended.cancel_requested THEN 'cancelled' ELSE 'failed_permanent' END",
        last_error="'worker lost: lease held by ' || coalesce(ended.lease_owner, '?')"
        " || ' expired at ' || ended.lease_expires_at::text",
        errors=_append_error("ended.errors", "ended.attempts", _LOST_ERROR.replace("j.", "ended.")),
        finished_at="now()",
    )
}
    RETURNING id, kind, status, queue
)
SELECT id, kind, status, queue FROM retried UNION ALL SELECT id, kind, status, queue FROM moved
"""


class Leases(QueueBase):
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

        Results come as JSON text from `encode_json`. One larger than `max_result_bytes` is
        refused without a statement (per-job state is bounded). A result the database refuses
        (a character the database encoding cannot represent, a value past a jsonb limit)
        must fail only its own job: a refused batch is split in halves until the rows it
        refuses stand alone, and every other row is written. The caller fails the refused.
        """
        completions = Completions(set(), {})
        batch = []
        for lease, result in sorted(done, key=lambda d: d[0].job_id):  # lock order
            if (size := _size_beyond(result, self.max_result_bytes)) is not None:
                completions.refused[lease.job_id] = (
                    f"the result is {size} bytes of JSON, more than the bound of"
                    f" {self.max_result_bytes} (JOBQ_MAX_PAYLOAD_BYTES)"
                )
            else:
                batch.append((lease, result))
        await with_history_leaves(
            conn or self.pool,
            self.history_leaf_width,
            lambda: self._complete(batch, completions, conn),
        )
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
        row = await self._write(_FAIL, lease.job_id, lease.token, _truncate(error), 0.0, True)
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
        row = await self._write(
            _FAIL, job.id, job.lease_token, _truncate(error), float(delay), permanent
        )
        return None if row is None else str(row["status"])

    async def mark_cancelled(self, lease: Lease, reason: str = "cancelled on request") -> bool:
        """The handler stopped for a cancel request: the run ends cancelled."""
        row = await self._write(_CANCELLED_BY_WORKER, lease.job_id, lease.token, _truncate(reason))
        return row is not None

    async def snooze(self, lease: Lease, seconds: float) -> str | None:
        """Put a running job back to wait `seconds` without counting its attempt; the new
        status (`queued`, `retrying`, or `cancelled` when a cancel was requested), or None
        when the lease was lost."""
        row = await self._write(_SNOOZE, lease.job_id, lease.token, float(seconds))
        return None if row is None else str(row["status"])

    async def _write(self, sql: str, *args: Any) -> asyncpg.Record | None:
        """One statement that may move a job to history, run on the pool."""
        return await with_history_leaves(
            self.pool, self.history_leaf_width, lambda: self.pool.fetchrow(sql, *args)
        )

    async def release(self, leases: Sequence[Lease]) -> list[uuid.UUID]:
        """Give running jobs back without counting the attempt (worker shutting down)."""
        if not leases:
            return []
        ids = [lease.job_id for lease in leases]
        tokens = [lease.token for lease in leases]

        async def release() -> list[asyncpg.Record]:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(_RELEASE, ids, tokens)
                for q in {r["queue"] for r in rows if r["status"] != "cancelled"}:
                    await conn.execute("SELECT pg_notify($1, $2)", NEW_JOB_CHANNEL, q)
            return list(rows)

        rows = await with_history_leaves(self.pool, self.history_leaf_width, release)
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
        ordered = sorted(leases, key=lambda lease: lease.job_id)  # lock order: _COMPLETE_MANY
        rows = await (conn or self.pool).fetch(
            _HEARTBEAT,
            [lease.job_id for lease in ordered],
            [lease.token for lease in ordered],
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

        async def rescue() -> list[asyncpg.Record]:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(_RESCUE, limit, *args)
                for q in {r["queue"] for r in rows if r["status"] == "retrying"}:
                    await conn.execute("SELECT pg_notify($1, $2)", NEW_JOB_CHANNEL, q)
            return list(rows)

        rows = await with_history_leaves(self.pool, self.history_leaf_width, rescue)
        return [Rescued(r["id"], r["kind"], r["status"]) for r in rows]


_T = TypeVar("_T")

# Leaves of history are made ahead by maintenance; one missing (maintenance not running yet,
# or a clock far ahead) must not fail the statements that end jobs.
_ENSURE_LEAVES = """
SELECT jobq_history_ensure_partition(c, now(), $2) FROM unnest($1::text[]) AS c
"""


async def with_history_leaves(
    db: Connection | asyncpg.Pool, width: timedelta, run: Callable[[], Awaitable[_T]]
) -> _T:
    """`run()`; when it found no leaf of history for a row (SQLSTATE 23514), the leaf is made
    and `run()` is tried once more. `run` must be a whole transaction (or one statement)."""
    try:
        return await run()
    except asyncpg.PostgresError as exc:
        classes = _missing_leaves(exc)
        if classes is None:
            raise
    await db.execute(_ENSURE_LEAVES, classes, width)
    return await run()


def _missing_leaves(exc: asyncpg.PostgresError) -> list[str] | None:
    """The history classes with no leaf for a row, from "no partition of relation
    "jobs_history_done" found for row"; None for any other error."""
    message = str(getattr(exc, "message", None) or exc)
    if getattr(exc, "sqlstate", None) != "23514" or "no partition of relation" not in message:
        return None
    classes = [c for c in ("done", "failed") if f'"jobs_history_{c}"' in message]
    return classes or ["done", "failed"]


def _size_beyond(text: str, bound: int) -> int | None:
    """The size of `text` in UTF-8 when above `bound`; else None (most texts are not encoded)."""
    if len(text) * 4 <= bound:
        return None
    size = len(text.encode())
    return size if size > bound else None


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
