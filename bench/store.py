"""What the benchmarks read and write beneath jobq's public API.

This is the only benchmark module that knows table and column names. Everything else goes
through `schema.migrate`, `Queue` and real `jobq worker` / `jobq api` processes. When the
storage layout changes (live table + history, see docs/storage.md), update the functions
here, and `bench/sql/drain_loop.sql`, and every benchmark keeps measuring the same thing.

Written against schema v2: one `jobs` table holding live and finished jobs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import asyncpg

# -- drains -----------------------------------------------------------------------------------


async def succeeded_count(conn: asyncpg.Connection | asyncpg.Pool, ids: list[uuid.UUID]) -> int:
    """How many of these jobs have succeeded (wherever finished jobs are kept)."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND status = 'succeeded'", ids
        )
    )


async def drain_outcome(
    conn: asyncpg.Connection | asyncpg.Pool, ids: list[uuid.UUID]
) -> dict[str, Any]:
    """once: succeeded on the first attempt; other: anything else; span: first start to last
    finish, in seconds."""
    row = await conn.fetchrow(
        """
        SELECT count(*) FILTER (WHERE status = 'succeeded' AND attempts = 1) AS once,
               count(*) FILTER (WHERE status <> 'succeeded' OR attempts <> 1) AS other,
               extract(epoch FROM max(finished_at) - min(started_at))::float8 AS span
        FROM jobs WHERE id = ANY($1::uuid[])
        """,
        ids,
    )
    assert row is not None
    return {"once": row["once"], "other": row["other"], "span": float(row["span"] or 0.0)}


async def forget_succeeded(conn: asyncpg.Connection | asyncpg.Pool, kind: str) -> None:
    """Drop a drain's jobs again, so that the next round starts from the same state."""
    await conn.execute("DELETE FROM jobs WHERE kind = $1 AND status = 'succeeded'", kind)
    await conn.execute("VACUUM ANALYZE jobs")


async def analyze(conn: asyncpg.Connection | asyncpg.Pool) -> None:
    await conn.execute("ANALYZE jobs")


async def vacuum(conn: asyncpg.Connection | asyncpg.Pool) -> None:
    """VACUUM (no FULL) of every table that holds jobs: what autovacuum would do after a drain."""
    await conn.execute("VACUUM jobs")


# -- history ----------------------------------------------------------------------------------

# N finished jobs, oldest first, finish times spread evenly over the last `days` days (so the
# last 15 minutes hold their share, as on a busy system): 97 % succeeded, 2 % failed_permanent
# after 3 attempts (with an error history), 1 % cancelled; 8 kinds, queues default and bulk.
# One INSERT ... SELECT per chunk, server-side: no rows cross the wire.
_SEED_HISTORY = """
INSERT INTO jobs (kind, queue, payload, status, attempts, max_attempts, run_at, last_error,
                  errors, result, created_at, updated_at, started_at, finished_at)
SELECT 'hist_' || (g % 8), CASE WHEN g % 5 = 0 THEN 'bulk' ELSE 'default' END,
       jsonb_build_object('i', g), s.status,
       CASE WHEN s.status = 'failed_permanent' THEN 3 ELSE 1 END, 3,
       s.t - interval '2 seconds',
       CASE WHEN s.status = 'failed_permanent' THEN 'ValueError: seeded failure' END,
       CASE WHEN s.status = 'failed_permanent' THEN jsonb_build_array(
           jsonb_build_object('attempt', 3, 'error', 'ValueError: seeded failure', 'at', s.t))
            ELSE '[]'::jsonb END,
       CASE WHEN s.status = 'succeeded' THEN jsonb_build_object('ok', true) END,
       s.t - interval '2 seconds', s.t, s.t - interval '1 second', s.t
FROM generate_series($1::bigint, $2::bigint) AS g,
     LATERAL (SELECT now() - make_interval(days => $4)
                         + (g::float8 / $3) * make_interval(days => $4) - interval '1 second' AS t,
                     CASE WHEN g % 100 < 2 THEN 'failed_permanent'
                          WHEN g % 100 = 2 THEN 'cancelled' ELSE 'succeeded' END AS status) AS s
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
    for start in range(1, n + 1, chunk):
        end = min(n, start + chunk - 1)
        await conn.execute(_SEED_HISTORY, start, end, n, days)
        if progress is not None:
            progress(end)


async def forget_history(conn: asyncpg.Connection) -> None:
    await conn.execute("DELETE FROM jobs WHERE kind LIKE 'hist\\_%'")


# -- retention emulation (for a schema without JOBQ_RETENTION) ------------------------------

# The runbook's batched DELETE ("Deleting old finished jobs").
_PRUNE_BATCH = """
DELETE FROM jobs WHERE id IN (
    SELECT id FROM jobs
    WHERE finished_at < now() - make_interval(secs => $1)
      AND status IN ('succeeded', 'failed_permanent', 'cancelled')
    ORDER BY finished_at
    LIMIT $2)
"""


async def prune_finished(conn: asyncpg.Connection, older_than_s: float, batch: int) -> int:
    total = 0
    while True:
        status = await conn.execute(_PRUNE_BATCH, older_than_s, batch)
        n = int(status.split()[-1])
        total += n
        if n < batch:
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
    """Live and dead tuples by the statistics collector (cheap, approximate)."""
    row = await conn.fetchrow(
        """
        SELECT coalesce(sum(n_live_tup), 0)::bigint AS live,
               coalesce(sum(n_dead_tup), 0)::bigint AS dead
        FROM pg_stat_user_tables WHERE schemaname = current_schema()
        """
    )
    assert row is not None
    return {"live_tuples": int(row["live"]), "dead_tuples": int(row["dead"])}


# -- the operator views' statements, for EXPLAIN -----------------------------------------

# (name, attribute of jobq.queue holding the SQL, arguments). A name the queue core no longer
# defines is reported as missing, not an error: the redesign names its statements anew.
OPERATOR_STATEMENTS: list[tuple[str, str, tuple[Any, ...]]] = [
    ("counts (GET /stats, GET /metrics, jobq status)", "_COUNTS", ()),
    ("finished per minute (GET /stats)", "_FINISHED_PER_MINUTE", (15,)),
    ("failing kinds (GET /stats)", "_FAILING_KINDS", (15, 5)),
    ("oldest due (GET /stats)", "_OLDEST_DUE", ()),
    ("unhandled (GET /stats)", "_UNHANDLED", ()),
]


def list_succeeded_statement() -> tuple[str, tuple[Any, ...]]:
    """What `GET /jobs?status=succeeded&limit=50` runs (the list endpoint builds it)."""
    from jobq.queue.model import _JOB_COLUMNS

    return (
        f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status = $1"
        " ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3",
        ("succeeded", 50, 0),
    )
