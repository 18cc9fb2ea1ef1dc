"""The statements that insert jobs, and the decisions around them, in one place for every driver.

`Queue.enqueue` (over jobq's own asyncpg pool), `jobq.txn` (on a caller's connection: asyncpg,
psycopg, SQLAlchemy, Django) and the HTTP batch route all insert jobs with the statements below.
The logic around them (validation, idempotency keys and their replays, conflicts) is written
once, as steps: a generator that yields each `Statement` to run and is sent the rows it
returned. A driver only runs statements (`run_steps` / `run_steps_sync` with its own `fetch`),
so the same decisions hold on every connection.

Statements use PostgreSQL's `$n` placeholders; `jobq.txn` renders them for drivers with
another parameter style. Rows are read by column name, and jsonb columns come back as text
(decoded here), so that each driver's own jsonb and json settings do not matter.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

import orjson

from jobq.queue.lookup import finished_not_before
from jobq.queue.model import (
    _JOB_FIELDS,
    _NOT_IN_HISTORY,
    NEW_JOB_CHANNEL,
    BulkEnqueued,
    EnqueueResult,
    IdempotencyConflict,
    Job,
    NewJob,
    _FirstUse,
)
from jobq.queue.validation import encode_json, fingerprint, validate

T = TypeVar("T")


class Row(Protocol):
    """A row read by column name: an asyncpg Record, or a dict made from another driver's."""

    def __getitem__(self, key: str, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    args: tuple[object, ...]
    # A keyed insert a version 3 process can make fail (its unique index on
    # jobs.idempotency_key exists until the post-deploy migration 0007): jobq's own pool runs it
    # in a savepoint and again; on a caller's connection the caller's transaction fails.
    keyed: bool = False


# Steps: yield a statement, receive its rows, return the outcome.
Steps = Generator[Statement, Sequence[Row], T]

_JSON_COLUMNS = frozenset({"payload", "errors", "result", "progress", "trace_context"})
# A job as every driver reads it the same way: jsonb as text.
_JOB_TEXT = ", ".join(f"{f}::text AS {f}" if f in _JSON_COLUMNS else f for f in _JOB_FIELDS)
_HISTORY_TEXT = ", ".join(
    f"{f}::text AS {f}" if f in _JSON_COLUMNS else _NOT_IN_HISTORY.get(f, f) for f in _JOB_FIELDS
)

_INSERT_COLUMNS = """kind, queue, payload, priority, max_attempts, run_at, idempotency_key,
                  request_fingerprint, concurrency_key, trace_context"""


def _derived_key(given: str, payload: str, kind: str, queue: str, paths: str) -> str:
    """A job's concurrency key: the one given, else the one its kind's (or else its queue's)
    declared payload path derives (jobq_flow_controls.key_path, stored by workers from their
    registries). The path lookup is only made for a job given no key. `payload`: the JSON
    text as json, which keeps numbers as written (migration 0017). The subquery (not flattened:
    its LIMIT) picks the value once; jobq_key_of_value, inlined, only reads that value."""
    return f"""coalesce({given}, (
        SELECT jobq_key_of_value(picked.v) FROM (
            SELECT {payload} #> c.key_path AS v FROM {paths} AS c
            WHERE c.key_path IS NOT NULL AND ((c.scope = 'kind' AND c.name = {kind})
                                              OR (c.scope = 'queue' AND c.name = {queue}))
            ORDER BY c.scope LIMIT 1) AS picked))"""


# Many jobs in one statement read the declared paths once: with none (the common case), the
# EXISTS is one initplan over an empty CTE and no job looks anything up.
_PATHS = """paths AS MATERIALIZED (
    SELECT scope, name, key_path FROM jobq_flow_controls WHERE key_path IS NOT NULL
)"""


def _derived_key_of_row(given: str, payload: str, kind: str, queue: str) -> str:
    return f"""CASE WHEN {given} IS NOT NULL THEN {given}
        WHEN EXISTS (SELECT FROM paths) THEN {_derived_key("NULL", payload, kind, queue, "paths")}
    END"""


# What an insert of one job returns: the job; or the job and the NOTIFY that wakes workers
# when it commits (in a caller's transaction: at its commit, with no round trip of its own).
_QUIET = "SELECT * FROM ins"
_WAKING = f"SELECT ins.*, pg_notify('{NEW_JOB_CHANNEL}', queue)::text AS _notified FROM ins"

_INSERT_UNKEYED_QUIET = f"""
WITH ins AS (
INSERT INTO jobs (id, {_INSERT_COLUMNS})
VALUES (jobq_uuid_v7(), $1, $2, $3::text::jsonb, $4, $5, coalesce($6::timestamptz, now()),
        NULL, NULL, {_derived_key("$7::text", "$3::text::json", "$1", "$2", "jobq_flow_controls")},
        $8::text::jsonb)
RETURNING {_JOB_TEXT}
) """
_INSERT_UNKEYED = _INSERT_UNKEYED_QUIET + _WAKING
_INSERT_UNKEYED_QUIET += _QUIET

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
    SELECT firsts.job_id, $1, $2, $3::text::jsonb, $4, $5, coalesce($6::timestamptz, now()),
           $7, $8,
           {_derived_key("$10::text", "$3::text::json", "$1", "$2", "jobq_flow_controls")},
           $11::text::jsonb
    FROM firsts JOIN taken USING (key)
    RETURNING {_JOB_TEXT}
)
"""
_INSERT_KEYED_QUIET = _KEYED + _QUIET
_INSERT_KEYED = _KEYED + _WAKING

# A key that is held, with its job when the job is still live (one statement for the common
# replay; a job already in history is read by _GET_TEXT).
_HELD_KEY = f"""
SELECT k.job_id AS held_job_id, k.fingerprint AS held_fingerprint, j.*
FROM jobq_idempotency_keys AS k
LEFT JOIN LATERAL (SELECT {_JOB_TEXT} FROM jobs WHERE id = k.job_id) AS j ON true
WHERE k.key = $1
"""
_SELECT_KEYS = (
    "SELECT key, job_id, fingerprint FROM jobq_idempotency_keys WHERE key = ANY($1::text[])"
)

# As Lookup.get, jsonb as text; many at once ($1 ids, $2 the earliest finish any can have).
_GET_TEXT = f"""
SELECT {_JOB_TEXT} FROM jobs WHERE id = $1
UNION ALL
SELECT {_HISTORY_TEXT} FROM jobs_history WHERE id = $1 AND finished_at >= $2
LIMIT 1
"""
_GET_MANY_TEXT = f"""
SELECT {_JOB_TEXT} FROM jobs WHERE id = ANY($1::uuid[])
UNION ALL
SELECT {_HISTORY_TEXT} FROM jobs_history
WHERE id = ANY($1::uuid[]) AND finished_at >= $2
"""

_NOTIFY_QUEUES = f"""notified AS (
    SELECT pg_notify('{NEW_JOB_CHANNEL}', q) FROM (SELECT DISTINCT queue AS q FROM ins) AS qs
)"""


def _insert_many_sql(returning: str) -> str:
    """Many jobs in one statement, in input order. A key's first use in the input takes the key
    (and creates its job, when taken); its later uses and keys held already create nothing."""
    return f"""
WITH input AS (
    -- Ids drawn here, row by row in input order, so that they sort as the input does.
    SELECT t.*, jobq_uuid_v7() AS id
    FROM unnest($1::text[], $2::text[], $3::text[], $4::smallint[], $5::int[],
                $6::timestamptz[], $7::text[], $8::text[], $10::text[], $11::text[])
         WITH ORDINALITY AS t(k, q, p, pr, ma, ra, ik, fp, ck, tc, n)
), firsts AS (
    SELECT DISTINCT ON (ik) ik AS key, n, id AS job_id, fp AS fingerprint
    FROM input WHERE ik IS NOT NULL
    ORDER BY ik, n
), {_PATHS}, taken AS ({_TAKE_KEYS}), ins AS (
    INSERT INTO jobs (id, {_INSERT_COLUMNS})
    SELECT i.id, i.k, i.q, i.p::jsonb, i.pr, i.ma,
           coalesce(i.ra, now()), i.ik, i.fp,
           {_derived_key_of_row("i.ck", "i.p::json", "i.k", "i.q")}, i.tc::jsonb
    FROM input AS i LEFT JOIN firsts AS f ON f.n = i.n
    WHERE i.ik IS NULL OR f.key IN (SELECT key FROM taken)
    ORDER BY i.n
    RETURNING {returning}
), {_NOTIFY_QUEUES}
SELECT *, (SELECT count(*) FROM notified) AS _n FROM ins
"""


def _insert_many_unkeyed_sql(returning: str) -> str:
    """The same without keys: no key to take, so no join to make."""
    return f"""
WITH {_PATHS}, ins AS (
    INSERT INTO jobs (id, {_INSERT_COLUMNS})
    SELECT jobq_uuid_v7(), k, q, p::jsonb, pr, ma, coalesce(ra, now()), NULL, NULL,
           {_derived_key_of_row("ck", "p::json", "k", "q")}, tc::jsonb
    FROM unnest($1::text[], $2::text[], $3::text[], $4::smallint[], $5::int[],
                $6::timestamptz[], $7::text[], $8::text[]) AS t(k, q, p, pr, ma, ra, ck, tc)
    RETURNING {returning}
), {_NOTIFY_QUEUES}
SELECT *, (SELECT count(*) FROM notified) AS _n FROM ins
"""


_IDS = "id, queue, idempotency_key"
_INSERT_MANY = _insert_many_sql(_IDS)
_INSERT_MANY_UNKEYED = _insert_many_unkeyed_sql(_IDS)
# The whole jobs, for callers that answer with them (POST /jobs/batch).
_INSERT_MANY_JOBS = _insert_many_sql(_JOB_TEXT)
_INSERT_MANY_JOBS_UNKEYED = _insert_many_unkeyed_sql(_JOB_TEXT)


def _trace_json(job: NewJob) -> str | None:
    return None if not job.trace_context else orjson.dumps(dict(job.trace_context)).decode()


def _aware(value: Any) -> Any:
    # Drivers return timestamptz in their session's time zone; a Job holds UTC. (asyncpg's
    # are UTC already: one attribute read.)
    if value is None or value.tzinfo is UTC:
        return value
    if isinstance(value, datetime) and value.tzinfo is not None and value.utcoffset():
        return value.astimezone(UTC)
    return value


_JSON_AT = [i for i, f in enumerate(_JOB_FIELDS) if f in _JSON_COLUMNS]
_UUID_AT = [i for i, f in enumerate(_JOB_FIELDS) if f in {"id", "lease_token"}]
_TIME_AT = [i for i, f in enumerate(_JOB_FIELDS) if f.endswith("_at") and f not in _JSON_COLUMNS]


def job_from_row(row: Row) -> Job:
    """A `Job` from a row of the statements above, whichever driver read it."""
    values = [row[f] for f in _JOB_FIELDS]
    for i in _JSON_AT:
        if values[i] is not None:
            values[i] = orjson.loads(values[i])
    for i in _UUID_AT:
        v = values[i]
        if v is not None and not isinstance(v, uuid.UUID):
            values[i] = uuid.UUID(str(v))
    for i in _TIME_AT:
        values[i] = _aware(values[i])
    return Job(*values)


# -- one job -------------------------------------------------------------------------------


def enqueue_steps(new: NewJob, window: timedelta, *, notify: bool = True) -> Steps[EnqueueResult]:
    """Insert one job; with an idempotency key, the job stored before for the same request.

    One statement when the job is created; a replay adds one (two when its job already ended).
    `notify`: the insert carries the NOTIFY that wakes workers (delivered at commit)."""
    job = validate(new)
    args: tuple[object, ...] = (
        job.kind,
        job.queue,
        encode_json("payload", job.payload),
        job.priority,
        job.max_attempts,
        job.run_at,
    )
    key = job.idempotency_key
    if key is None:
        rows = yield Statement(
            _INSERT_UNKEYED if notify else _INSERT_UNKEYED_QUIET,
            (*args, job.concurrency_key, _trace_json(job)),
        )
        return EnqueueResult(job_from_row(rows[0]), created=True)
    fp = fingerprint(job)
    sql = _INSERT_KEYED if notify else _INSERT_KEYED_QUIET
    for _ in range(3):
        rows = yield Statement(
            sql, (*args, key, fp, window, job.concurrency_key, _trace_json(job)), keyed=True
        )
        if rows:
            return EnqueueResult(job_from_row(rows[0]), created=True)
        # The key is held. A fresh statement sees the committed key row.
        held_rows = yield Statement(_HELD_KEY, (key,))
        if not held_rows:
            continue  # released in between: try to take it again
        held = held_rows[0]
        job_id = held["held_job_id"]
        if not isinstance(job_id, uuid.UUID):
            job_id = uuid.UUID(str(job_id))
        if held["held_fingerprint"] != fp:
            raise IdempotencyConflict(key, job_id)
        if held["id"] is not None:
            return EnqueueResult(job_from_row(held), created=False)
        ended = yield Statement(_GET_TEXT, (job_id, finished_not_before(job_id)))
        if not ended:
            raise IdempotencyConflict(key, job_id, gone=True)
        return EnqueueResult(job_from_row(ended[0]), created=False)
    raise RuntimeError("idempotent insert did not settle")  # pragma: no cover


# -- many jobs -----------------------------------------------------------------------------


def insert_batch_steps(
    checked: Sequence[NewJob],
    window: timedelta,
    *,
    offset: int = 0,
    first_uses: dict[str, _FirstUse] | None = None,
    payloads: Sequence[str] | None = None,
) -> Steps[list[BulkEnqueued]]:
    """One statement for `checked` (validated jobs, positions `offset`.. of the caller's input),
    within the caller's transaction. `first_uses` carries each key's first use across batches,
    so that a key reused within one input is told apart from one stored before it. Raises
    IdempotencyConflict (nothing of the batch is kept only if the caller's transaction ends)."""
    stored, _ = yield from _batch(checked, window, offset, first_uses, payloads, jobs=False)
    return stored


def insert_job_rows_steps(
    checked: Sequence[NewJob], window: timedelta, *, payloads: Sequence[str] | None = None
) -> Steps[list[tuple[Row, bool]]]:
    """As insert_batch_steps, answering each job whole, as its row (`jobs_from_rows` makes
    them `Job`s), with whether this call created it, in input order. One statement when no key
    was stored before; jobs of replays are read by one more."""
    stored, rows = yield from _batch(checked, window, 0, None, payloads, jobs=True)
    if len(rows) == len(stored) and all(s.created for s in stored):
        # Every job created, in input order (the insert's ORDER BY): nothing to look up.
        return [(r, True) for r in rows]
    by_id = {r["id"]: r for r in rows}
    missing = list({s.id for s in stored if s.id not in by_id})
    if missing:
        bound = min(finished_not_before(i) for i in missing)
        for r in (yield Statement(_GET_MANY_TEXT, (missing, bound))):
            by_id[r["id"]] = r
    out = []
    for i, (new, s) in enumerate(zip(checked, stored, strict=True)):
        row = by_id.get(s.id)
        if row is None:  # its key is remembered, its job was removed by retention
            raise IdempotencyConflict(new.idempotency_key or "", s.id, index=i, gone=True)
        out.append((row, s.created))
    return out


def jobs_from_rows(stored: Sequence[tuple[Row, bool]]) -> list[tuple[Job, bool]]:
    """The jobs of `insert_job_rows_steps`; a key used twice in its input, one job twice."""
    jobs: dict[int, Job] = {}  # by row
    out = []
    for row, created in stored:
        job = jobs.get(id(row))
        if job is None:
            job = jobs[id(row)] = job_from_row(row)
        out.append((job, created))
    return out


def _batch(
    checked: Sequence[NewJob],
    window: timedelta,
    offset: int,
    first_uses: dict[str, _FirstUse] | None,
    payloads: Sequence[str] | None,
    *,
    jobs: bool,
) -> Steps[tuple[list[BulkEnqueued], list[Row]]]:
    first_uses = {} if first_uses is None else first_uses
    if payloads is None:
        payloads = [encode_json("payload", j.payload) for j in checked]
    fps = [fingerprint(j) if j.idempotency_key is not None else None for j in checked]
    rows = list((yield _rows_statement(checked, payloads, fps, window, whole=jobs)))
    if all(j.idempotency_key is None for j in checked):
        return [BulkEnqueued(r["id"], True) for r in rows], rows
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
        for r in (yield Statement(_SELECT_KEYS, (missing,))):
            first_uses[r["key"]] = _FirstUse(_as_uuid(r["job_id"]), r["fingerprint"], index=None)
        # Keys released between the insert and the read: their first uses try again.
        again = [firsts[k] for k in missing if k not in first_uses]
        if again:
            retried = yield _rows_statement(
                [checked[i] for i in again], [payloads[i] for i in again],
                [fps[i] for i in again], window, whole=jobs,
            )  # fmt: skip
            rows += retried
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
    return out, rows


def _as_uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _rows_statement(
    jobs: Sequence[NewJob],
    payloads: Sequence[str],
    fps: Sequence[str | None],
    window: timedelta,
    *,
    whole: bool,
) -> Statement:
    args: tuple[object, ...] = (
        [j.kind for j in jobs],
        [j.queue for j in jobs],
        list(payloads),
        [j.priority for j in jobs],
        _or_null([j.max_attempts for j in jobs]),
        _or_null([j.run_at for j in jobs]),
    )
    traces = [_trace_json(j) for j in jobs] if any(j.trace_context for j in jobs) else None
    concurrency_keys = _or_null([j.concurrency_key for j in jobs])
    if all(fp is None for fp in fps):  # no key: nothing a version 3 process can hold
        return Statement(
            _INSERT_MANY_JOBS_UNKEYED if whole else _INSERT_MANY_UNKEYED,
            (*args, concurrency_keys, traces),
        )
    args += (
        [j.idempotency_key for j in jobs],
        list(fps),
        window,
        concurrency_keys,
        traces,
    )
    return Statement(_INSERT_MANY_JOBS if whole else _INSERT_MANY, args, keyed=True)


def _or_null(values: list[Any]) -> list[Any] | None:
    """NULL (no array) when every job's value is NULL: unnest pads it with NULLs, and the
    driver does not encode (and check) a thousand NULLs."""
    return values if any(v is not None for v in values) else None


# -- drivers -------------------------------------------------------------------------------


async def run_steps(steps: Steps[T], fetch: Callable[[Statement], Awaitable[Sequence[Row]]]) -> T:
    """Run steps on an async driver: `fetch` runs one statement and returns its rows."""
    try:
        statement = next(steps)
        while True:
            statement = steps.send(await fetch(statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def run_steps_sync(steps: Steps[T], fetch: Callable[[Statement], Sequence[Row]]) -> T:
    """Run steps on a sync driver."""
    try:
        statement = next(steps)
        while True:
            statement = steps.send(fetch(statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
