"""A version-3 jobq process, for upgrade tests: the statements schema v3's code ran (from
`src/jobq/queue.py` at 4ed2eff, copied as they were), and a worker and an enqueuer issuing
them while the database is upgraded under them.

Version 3 keeps every job in `jobs`: it ends a job by updating its row in place and
deduplicates keys through the unique index `jobs_idempotency_key_idx`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson

NEW_JOB_CHANNEL = "jobq_jobs"
MAX_ERROR_HISTORY = 20

_JOB_COLUMNS = (
    "id, kind, queue, payload, status, priority, attempts, max_attempts, run_at, "
    "idempotency_key, cancel_requested, lease_owner, lease_token, lease_expires_at, "
    "retry_delay_seconds, last_error, errors, result, created_at, updated_at, started_at, "
    "finished_at"
)
_CLAIM_RETURNING = (
    "j.id, j.kind, j.queue, j.payload, j.status, j.priority, j.attempts, j.max_attempts, "
    "j.run_at, j.idempotency_key, j.cancel_requested, j.lease_owner, j.lease_token, "
    "j.lease_expires_at, j.retry_delay_seconds, NULL::text AS last_error, "
    "'[]'::jsonb AS errors, NULL::jsonb AS result, j.created_at, j.updated_at, "
    "j.started_at, j.finished_at"
)


def _append_error(errors: str, attempt: str, error: str) -> str:
    return (
        f"jsonb_path_query_array({errors} || jsonb_build_array(jsonb_build_object("
        f"'attempt', {attempt}, 'error', {error}, 'at', now())),"
        f" '$[last - {MAX_ERROR_HISTORY - 1} to last]')"
    )


INSERT_QUIET = f"""
INSERT INTO jobs (kind, queue, payload, priority, max_attempts, run_at,
                  idempotency_key, request_fingerprint)
VALUES ($1, $2, $3::text::jsonb, $4, $5, coalesce($6, now()), $7, $8)
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING {_JOB_COLUMNS}
"""

SELECT_BY_KEY = f"""
SELECT {_JOB_COLUMNS}, request_fingerprint FROM jobs WHERE idempotency_key = $1
"""

CLAIM = f"""
WITH RECURSIVE pairs AS (
    (SELECT q.queue, p.priority
     FROM unnest($3::text[]) AS q(queue)
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
    SELECT c.id
    FROM (SELECT DISTINCT priority FROM pairs ORDER BY priority) AS level
    CROSS JOIN LATERAL (
        SELECT d.id, d.run_at
        FROM pairs
        CROSS JOIN LATERAL (
            SELECT id, run_at FROM jobs
            WHERE status IN ('queued', 'retrying') AND queue = pairs.queue
              AND priority = level.priority AND run_at <= now()
              AND kind = ANY($2::text[])
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
SET status = 'running',
    attempts = j.attempts + 1,
    max_attempts = coalesce(
        j.max_attempts,
        (SELECT m.n FROM unnest($6::text[], $7::int[]) AS m(kind, n) WHERE m.kind = j.kind),
        $8),
    started_at = now(),
    updated_at = now(),
    lease_owner = $1,
    lease_token = gen_random_uuid(),
    lease_expires_at = now() + make_interval(secs => $5)
FROM picked
WHERE j.id = picked.id
RETURNING {_CLAIM_RETURNING}
"""

COMPLETE_MANY = """
UPDATE jobs AS j
SET status = 'succeeded',
    result = r.result::jsonb,
    finished_at = now(),
    updated_at = now(),
    lease_token = NULL,
    lease_expires_at = NULL
FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS r(id, token, result)
WHERE j.id = r.id AND j.lease_token = r.token AND j.status = 'running'
RETURNING j.id
"""

_RETRIES = "(NOT $5 AND NOT cancel_requested AND attempts < max_attempts)"
FAIL = f"""
UPDATE jobs
SET status = CASE WHEN {_RETRIES} THEN 'retrying'
                  WHEN cancel_requested THEN 'cancelled'
                  ELSE 'failed_permanent' END,
    run_at = CASE WHEN {_RETRIES} THEN now() + make_interval(secs => $4) ELSE run_at END,
    retry_delay_seconds = CASE WHEN {_RETRIES} THEN $4 ELSE retry_delay_seconds END,
    finished_at = CASE WHEN {_RETRIES} THEN NULL ELSE now() END,
    last_error = $3,
    errors = {_append_error("errors", "attempts", "$3::text")},
    updated_at = now(),
    lease_token = NULL,
    lease_expires_at = NULL
WHERE id = $1 AND lease_token = $2 AND status = 'running'
RETURNING status
"""

HEARTBEAT = """
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


def fingerprint(
    kind: str,
    payload: dict[str, Any],
    queue: str = "default",
    priority: int = 0,
    max_attempts: int | None = None,
) -> str:
    """Version 3's request fingerprint of a job enqueued without run_at."""
    canonical = orjson.dumps(
        {
            "kind": kind,
            "payload": payload,
            "queue": queue,
            "priority": priority,
            "max_attempts": max_attempts,
            "run_at": None,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


async def enqueue(
    conn: asyncpg.Connection | asyncpg.Pool,
    kind: str,
    payload: dict[str, Any] | None = None,
    *,
    key: str | None = None,
) -> uuid.UUID:
    """Store a job as version 3 did; with a key already held, the held job's id."""
    body = payload or {}
    fp = fingerprint(kind, body) if key is not None else None
    row = await conn.fetchrow(
        INSERT_QUIET, kind, "default", orjson.dumps(body).decode(), 0, None, None, key, fp
    )
    if row is None:
        row = await conn.fetchrow(SELECT_BY_KEY, key)
        assert row is not None and row["request_fingerprint"] == fp
    job_id: uuid.UUID = row["id"]
    return job_id


class V3Worker:
    """Claims with version 3's statements and holds every job of the `held` kinds, extending
    its lease by heartbeat, until `release()`; other kinds complete as soon as claimed.

    `completed` holds the jobs whose fenced completion matched their lease; `refused` those
    whose completion changed nothing (the lease was lost)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        kinds: Sequence[str],
        held: Sequence[str] = (),
        *,
        name: str = "v3-worker",
        lease_seconds: float = 5.0,
    ) -> None:
        self.pool = pool
        self.kinds = list(kinds)
        self.held_kinds = set(held)
        self.name = name
        self.lease_seconds = lease_seconds
        self.holding: dict[uuid.UUID, uuid.UUID] = {}
        self.completed: set[uuid.UUID] = set()
        self.refused: set[uuid.UUID] = set()
        self.lost_heartbeats: set[uuid.UUID] = set()
        self._release = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def release(self) -> None:
        self._release.set()

    async def stop(self) -> None:
        """Stop claiming, complete what is held, and return once every job is written."""
        self._release.set()
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeats())
        try:
            while not self._stop.is_set():
                rows = await self.pool.fetch(
                    CLAIM, self.name, self.kinds, ["default"], 50, self.lease_seconds, [], [], 3
                )
                quick = []
                for r in rows:
                    if r["kind"] in self.held_kinds:
                        self.holding[r["id"]] = r["lease_token"]
                    else:
                        quick.append((r["id"], r["lease_token"]))
                await self._complete(quick)
                if self._release.is_set() and self.holding:
                    held, self.holding = list(self.holding.items()), {}
                    await self._complete(held)
                if not rows:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), 0.02)
            await self._complete(list(self.holding.items()))
            self.holding = {}
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def _complete(self, leases: list[tuple[uuid.UUID, uuid.UUID]]) -> None:
        if not leases:
            return
        ids = [i for i, _ in leases]
        done = await self.pool.fetch(
            COMPLETE_MANY, ids, [t for _, t in leases], ['{"by": "v3"}'] * len(leases)
        )
        written = {r["id"] for r in done}
        self.completed |= written
        self.refused |= set(ids) - written

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 5)
            if not self.holding:
                continue
            held = dict(self.holding)
            rows = await self.pool.fetch(
                HEARTBEAT, list(held), list(held.values()), self.lease_seconds
            )
            self.lost_heartbeats |= set(held) - {r["id"] for r in rows}


class V3Enqueuer:
    """Enqueues a job every `interval` seconds as version 3 did, every fifth with a key;
    `ids` holds each job it stored, `keys` each key with its job."""

    def __init__(self, pool: asyncpg.Pool, kind: str, *, interval: float = 0.01) -> None:
        self.pool = pool
        self.kind = kind
        self.interval = interval
        self.ids: list[uuid.UUID] = []
        self.keys: dict[str, uuid.UUID] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            key = f"v3-live-{n}" if n % 5 == 0 else None
            job_id = await enqueue(self.pool, self.kind, {"n": n}, key=key)
            self.ids.append(job_id)
            if key is not None:
                self.keys[key] = job_id
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)
