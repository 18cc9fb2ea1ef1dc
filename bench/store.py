"""What the benchmarks read and write beneath jobq's public API.

This is the only benchmark module that knows table and column names. Everything else goes
through `schema.migrate`, `Queue` and real `jobq worker` / `jobq api` processes. When the
storage layout changes, update the functions here, and `bench/sql_ceiling.sh`, and every
benchmark keeps measuring the same thing.

Written for both layouts: schema v3 (one `jobs` table holding live and finished jobs) and
the live + history layout of schema 4 on (docs/storage.md), where a finished job is in
`jobs_history`, or still in `jobs` when a version-3 process finished it. Which one a
database has is read from the catalog (`jobs_history` exists or not).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

Conn = asyncpg.Connection | asyncpg.Pool


@contextlib.asynccontextmanager
async def migrated_database(admin: str, label: str) -> AsyncIterator[str]:
    """A database of its own on `admin`'s server, migrated by this checkout's jobq; dropped at
    the end. Yields its DSN."""
    from jobq import db, schema

    name = f"jobq_{label}_{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f"CREATE DATABASE {name}")
    await conn.close()
    dsn = admin.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrating = await db.connect(dsn)
        await schema.migrate(migrating)
        await migrating.close()
        yield dsn
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.close()


# Seeded history lives in leaves as wide as jobq's default (`Queue(history_leaf_width=...)`).
SEED_LEAF_WIDTH = timedelta(days=1)


async def has_history(conn: Conn) -> bool:
    """Whether finished jobs may live in `jobs_history` (schema 4 on)."""
    return bool(await conn.fetchval("SELECT to_regclass('jobs_history') IS NOT NULL"))


def created_at_of(job_id: uuid.UUID) -> datetime:
    """The creation instant a UUIDv7 carries (its first 48 bits, milliseconds since 1970)."""
    return datetime.fromtimestamp((job_id.int >> 80) / 1000, UTC)


# -- drains -----------------------------------------------------------------------------------

# Where the jobs of a drain are, wherever finished jobs are kept. The history branch is bounded
# below by the earliest creation instant among the ids (no job finishes before it was
# created), so that only the leaves of the drain's own time are probed, not every day of
# seeded history.
_OF_IDS_V3 = """
SELECT status, attempts, started_at, finished_at FROM jobs WHERE id = ANY($1::uuid[])
"""
_OF_IDS = """
SELECT status, attempts, started_at, finished_at FROM jobs WHERE id = ANY($1::uuid[])
UNION ALL
SELECT status, attempts, started_at, finished_at FROM jobs_history
WHERE id = ANY($1::uuid[]) AND finished_at >= $2
"""


async def _of_ids(conn: Conn, ids: list[uuid.UUID]) -> tuple[str, tuple[Any, ...]]:
    if not await has_history(conn):
        return _OF_IDS_V3, (ids,)
    since = min((created_at_of(i) for i in ids), default=datetime.now(UTC))
    # A millisecond of slack: clock_timestamp() is truncated to the millisecond in the id.
    return _OF_IDS, (ids, since - timedelta(milliseconds=1))


async def succeeded_count(conn: Conn, ids: list[uuid.UUID]) -> int:
    """How many of these jobs have succeeded (wherever finished jobs are kept)."""
    rows, args = await _of_ids(conn, ids)
    sql = f"SELECT count(*) FROM ({rows}) AS j WHERE status = 'succeeded'"
    return int(await conn.fetchval(sql, *args))


_LIVE_OF_IDS = """
SELECT count(*) FROM jobs
WHERE id = ANY($1::uuid[]) AND status IN ('queued', 'running', 'retrying')
"""


async def unfinished_count(conn: Conn, ids: list[uuid.UUID]) -> int:
    """How many of these jobs have not ended yet: the live table only, in either layout (a
    finished row left in `jobs` has a final status). Cheaper than counting where they
    ended, which matters for a poll that runs beside the drain it waits for."""
    return int(await conn.fetchval(_LIVE_OF_IDS, ids))


async def drain_outcome(conn: Conn, ids: list[uuid.UUID]) -> dict[str, Any]:
    """once: succeeded on the first attempt; other: anything else (a job missing from both
    tables, or present twice, counts as other); span: first start to last finish, in seconds."""
    rows, args = await _of_ids(conn, ids)
    row = await conn.fetchrow(
        f"""
        SELECT count(*) FILTER (WHERE status = 'succeeded' AND attempts = 1) AS once,
               count(*) FILTER (WHERE status <> 'succeeded' OR attempts <> 1) AS other,
               count(*) AS found,
               extract(epoch FROM max(finished_at) - min(started_at))::float8 AS span
        FROM ({rows}) AS j
        """,
        *args,
    )
    assert row is not None
    other = int(row["other"]) + abs(len(ids) - int(row["found"]))
    return {"once": int(row["once"]), "other": other, "span": float(row["span"] or 0.0)}


async def forget_succeeded(conn: Conn, kind: str) -> None:
    """Drop a drain's jobs again, so that the next round starts from the same state."""
    await conn.execute("DELETE FROM jobs WHERE kind = $1 AND status = 'succeeded'", kind)
    if await has_history(conn):
        await conn.execute(
            "DELETE FROM jobs_history WHERE kind = $1 AND status = 'succeeded'", kind
        )
        await conn.execute("VACUUM ANALYZE jobs_history")
    await conn.execute("VACUUM ANALYZE jobs")


async def analyze(conn: Conn) -> None:
    await conn.execute("ANALYZE jobs")


async def vacuum(conn: Conn) -> None:
    """VACUUM (no FULL) of every table that holds jobs: what autovacuum would do after a drain."""
    await conn.execute("VACUUM jobs")
    if await has_history(conn):
        await conn.execute("VACUUM jobs_history")


async def succeeded_total(conn: Conn) -> int:
    """Every succeeded job in the database, wherever it is kept."""
    n = int(await conn.fetchval("SELECT count(*) FROM jobs WHERE status = 'succeeded'"))
    if await has_history(conn):
        n += int(
            await conn.fetchval("SELECT count(*) FROM jobs_history WHERE status = 'succeeded'")
        )
    return n


async def _all_jobs(conn: Conn) -> str:
    """Every job's row source, live and finished."""
    if not await has_history(conn):
        return "jobs"
    return (
        "(SELECT kind, status, result FROM jobs"
        " UNION ALL SELECT kind, status, result FROM jobs_history)"
    )


async def succeeded_of_kind(conn: Conn, kind: str) -> int:
    """Succeeded jobs of one kind, wherever they are kept."""
    source = await _all_jobs(conn)
    sql = f"SELECT count(*) FROM {source} AS j WHERE kind = $1 AND status = 'succeeded'"
    return int(await conn.fetchval(sql, kind))


async def stored_of_kind(conn: Conn, kind: str) -> int:
    """Jobs of one kind in any state, wherever they are kept."""
    source = await _all_jobs(conn)
    return int(await conn.fetchval(f"SELECT count(*) FROM {source} AS j WHERE kind = $1", kind))


async def results_of_kind(conn: Conn, kind: str, field: str) -> list[float]:
    """One numeric field of the results of a kind's succeeded jobs."""
    source = await _all_jobs(conn)
    rows = await conn.fetch(
        f"SELECT (result->>$2)::float8 AS v FROM {source} AS j"
        " WHERE kind = $1 AND status = 'succeeded'",
        kind,
        field,
    )
    return [float(r["v"]) for r in rows]


async def empty_all(conn: Conn) -> None:
    """No job anywhere, and rollups that say so (TRUNCATE fires no trigger)."""
    if not await has_history(conn):
        await conn.execute("TRUNCATE jobs")
        return
    await conn.execute(
        "TRUNCATE jobs, jobs_history, jobq_idempotency_keys, jobq_counts, jobq_count_deltas,"
        " jobq_finished_minutes"
    )


# -- history ----------------------------------------------------------------------------------

# N finished jobs, oldest first, finish times spread evenly over the last `days` days (so the
# last 15 minutes hold their share, as on a busy system): 97 % succeeded, 2 % failed_permanent
# after 3 attempts (with an error history), 1 % cancelled; 8 kinds, queues default and bulk.
# One INSERT ... SELECT per chunk, server-side: no rows cross the wire.
_SEED_ROWS = """
FROM generate_series($1::bigint, $2::bigint) AS g,
     LATERAL (SELECT now() - make_interval(days => $4)
                         + (g::float8 / $3) * make_interval(days => $4) - interval '1 second' AS t,
                     CASE WHEN g % 100 < 2 THEN 'failed_permanent'
                          WHEN g % 100 = 2 THEN 'cancelled' ELSE 'succeeded' END AS status) AS s
"""
_SEED_VALUES = """
       'hist_' || (g % 8), CASE WHEN g % 5 = 0 THEN 'bulk' ELSE 'default' END,
       jsonb_build_object('i', g), s.status,
       CASE WHEN s.status = 'failed_permanent' THEN 3 ELSE 1 END, 3,
       s.t - interval '2 seconds',
       CASE WHEN s.status = 'failed_permanent' THEN 'ValueError: seeded failure' END,
       CASE WHEN s.status = 'failed_permanent' THEN jsonb_build_array(
           jsonb_build_object('attempt', 3, 'error', 'ValueError: seeded failure', 'at', s.t))
            ELSE '[]'::jsonb END,
       CASE WHEN s.status = 'succeeded' THEN jsonb_build_object('ok', true) END,
       s.t - interval '2 seconds'
"""

# Schema v3: into the one table (its nine indexes maintained), ids made now by the default.
_SEED_HISTORY_V3 = f"""
INSERT INTO jobs (kind, queue, payload, status, attempts, max_attempts, run_at, last_error,
                  errors, result, created_at, updated_at, started_at, finished_at)
SELECT {_SEED_VALUES}, s.t, s.t - interval '1 second', s.t
{_SEED_ROWS}
"""

# Live + history: into the partitioned history (its leaves' four indexes maintained, the
# statement triggers counting the rows). Ids are UUIDv7 of the seeded creation time, as
# jobq_uuid_v7() would have made them then: lists order by id and lookups bound the history
# by the creation instant an id carries.
_SEED_HISTORY = f"""
INSERT INTO jobs_history (id, kind, queue, payload, status, attempts, max_attempts, run_at,
                          last_error, errors, result, created_at, priority, cancel_requested,
                          started_at, finished_at)
SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing substring(int8send(
           (extract(epoch FROM s.t - interval '2 seconds') * 1000)::bigint) FROM 3)
           FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid,
       {_SEED_VALUES}, 0, s.status = 'cancelled', s.t - interval '1 second', s.t
{_SEED_ROWS}
"""

# Every leaf the seeded finish times need, both classes (created and attached by jobq's own
# function, as the completion path does).
_SEED_LEAVES = """
SELECT jobq_history_ensure_partition(c.class, t, $2::interval)
FROM (VALUES ('done'), ('failed')) AS c(class),
     generate_series(now() - make_interval(days => $1) - $2::interval, now() + $2::interval,
                     $2::interval) AS t
"""


async def seed_history(
    conn: asyncpg.Connection,
    n: int,
    *,
    days: int = 3,
    chunk: int = 250_000,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Insert `n` finished jobs as if they had run over the last `days` days."""
    history = await has_history(conn)
    if history:
        await conn.execute(_SEED_LEAVES, days, SEED_LEAF_WIDTH)
    for start in range(1, n + 1, chunk):
        end = min(n, start + chunk - 1)
        await conn.execute(_SEED_HISTORY if history else _SEED_HISTORY_V3, start, end, n, days)
        if progress is not None:
            progress(end)


async def seeded(conn: asyncpg.Connection) -> tuple[int, int]:
    """(seeded finished jobs, future-scheduled jobs) a database holds already."""
    tables = ["jobs", "jobs_history"] if await has_history(conn) else ["jobs"]
    finished = 0
    for table in tables:
        finished += int(
            await conn.fetchval(f"SELECT count(*) FROM {table} WHERE kind LIKE 'hist\\_%'")
        )
    future = int(
        await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE kind = 'noop' AND run_at > now() + interval '1 day'"
        )
    )
    return finished, future


async def leaf_no_wider_than(conn: asyncpg.Connection, seconds: float) -> bool:
    """Whether both history classes have a leaf for now() at most `seconds` wide."""
    n = await conn.fetchval(
        """
        SELECT count(DISTINCT class) FROM jobq_history_partitions
        WHERE lower_bound <= now() AND now() < upper_bound
          AND upper_bound - lower_bound <= make_interval(secs => $1)
        """,
        seconds,
    )
    return int(n) == 2


async def forget_history(conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM jobs WHERE kind LIKE 'hist\\_%'")
    if await has_history(conn):
        await conn.execute("DELETE FROM jobs_history WHERE kind LIKE 'hist\\_%'")


# -- retention emulation (for a schema without JOBQ_RETENTION) ------------------------------

# The runbook's batched DELETE ("Deleting old finished jobs"), on a schema-v3 database. From
# schema 4 on, retention is jobq's own (JOBQ_RETENTION, leaves dropped whole); the DELETE
# then reaches both tables, for comparison only.
_PRUNE_BATCH = """
DELETE FROM {table} WHERE id IN (
    SELECT id FROM {table}
    WHERE finished_at < now() - make_interval(secs => $1)
      AND status IN ('succeeded', 'failed_permanent', 'cancelled')
    ORDER BY finished_at
    LIMIT $2)
"""


async def prune_finished(conn: asyncpg.Connection, older_than_s: float, batch: int) -> int:
    total = 0
    tables = ["jobs", "jobs_history"] if await has_history(conn) else ["jobs"]
    for table in tables:
        while True:
            status = await conn.execute(_PRUNE_BATCH.format(table=table), older_than_s, batch)
            n = int(status.split()[-1])
            total += n
            if n < batch:
                break
    return total


# -- sizes (schema-agnostic: every table and partition in jobq's schema) ------------------


async def relation_sizes(conn: asyncpg.Connection) -> dict[str, int]:
    """Bytes on disk per table (heap + indexes + TOAST), partitions counted as their own
    tables; a partitioned parent holds nothing itself."""
    rows = await conn.fetch(
        """
        SELECT c.relname, pg_total_relation_size(c.oid) AS bytes
        FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'm')
        ORDER BY c.relname
        """
    )
    return {r["relname"]: int(r["bytes"]) for r in rows}


async def index_sizes(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        """
        SELECT c.relname, pg_relation_size(c.oid) AS bytes
        FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = current_schema() AND c.relkind = 'i'
        ORDER BY c.relname
        """
    )
    return {r["relname"]: int(r["bytes"]) for r in rows}


async def tuple_counts(conn: asyncpg.Connection) -> dict[str, int]:
    """Live and dead tuples by the statistics collector (cheap, approximate), and how many
    history leaves exist (0 on schema v3)."""
    row = await conn.fetchrow(
        """
        SELECT coalesce(sum(n_live_tup), 0)::bigint AS live,
               coalesce(sum(n_dead_tup), 0)::bigint AS dead,
               count(*) FILTER (WHERE relname LIKE 'jobs\\_history\\_%\\_%')::int AS leaves
        FROM pg_stat_user_tables WHERE schemaname = current_schema()
        """
    )
    assert row is not None
    return {
        "live_tuples": int(row["live"]),
        "dead_tuples": int(row["dead"]),
        "history_leaves": int(row["leaves"]),
    }
