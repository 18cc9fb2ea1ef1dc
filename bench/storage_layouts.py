"""Candidate storage layouts, prototyped with plain SQL: WAL bytes per job and the SQL-only
drain rate of each, measured in one run (`python -m bench.storage --only layouts`).

Every layout runs the same life for --layout-n jobs in a database of its own: bulk insert in
chunks of 5,000 (as `Queue.enqueue_many`), then claim 250 due jobs with SKIP LOCKED and lease
them, then complete them fenced by lease token (two commits per batch, as `jobq.Worker`),
from one connection, no Python work per job. `v2` and `v2_slim` run jobq's own statements
from `jobq.queue` against the migrated schema; the others run the statements written below
against scratch tables. The point is the relative cost of each layout, not absolute speed.

Layouts:
- v2: today's schema (one `jobs` table, nine indexes).
- v2_slim: today's table without the five list/finished indexes (claim, lease, key, pkey):
  the floor for "keep one table, drop indexes".
- lh_full: a live table (pkey, claim, lease, list-by-created) plus a history table
  partitioned by finish time (daily) holding every list index of today (id, created,
  status+created, kind+created, queue+created); completion moves the row in one statement
  (DELETE ... RETURNING into INSERT).
- lh_design: live as lh_full; history with id, created, kind+created, queue+created and a
  partial status+created index for the statuses that are not `succeeded`.
- lh_by_id: live without a list index; history ordered by id (UUIDv7, creation order to the
  millisecond) instead of created_at: id, kind+id, queue+id, partial status+id (not
  `succeeded`): every filter of today's list, one index fewer on each table.
- lh_hot: lh_by_id with a live table whose indexes mention no column the claim or a
  heartbeat changes (pkey and a non-partial claim index only): claim and heartbeat are HOT
  updates. The price: the claim index holds running rows too, and rescue has no index.
- lh_by_id_ff50, lh_by_id_ff30: lh_by_id with the live table at fillfactor 50 / 30, so
  that more claim updates find room on the same page (PostgreSQL then logs only the
  changed middle of the row, not the whole new version).
- lh_asc: lh_by_id_ff50 with the history indexes ascending (newest first is a backward
  scan): appends at the right edge split pages 90/10, DESC indexes split 50/50 at the left.
- lh_asc_copy: lh_asc with the bulk insert as COPY and client-made UUIDv7 ids (heap
  multi-insert records), which keys in their own table make possible (no ON CONFLICT).
- lh_min: a live table with only what claim, rescue and lookup need; history with id and
  created only: the floor for the two-table shape.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.storage import wal_between, wal_by_record_type, wal_by_relation, wal_position
from bench.suite import emit, fresh_db, log, r
from jobq.queue import enqueue as q_enqueue
from jobq.queue import leases as q_leases

CHUNK = 5000
BATCH = 250

_COLUMNS = """
    id                  uuid        NOT NULL DEFAULT jobq_uuid_v7(),
    kind                text        NOT NULL,
    queue               text        NOT NULL DEFAULT 'default',
    payload             jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status              text        NOT NULL DEFAULT 'queued',
    priority            smallint    NOT NULL DEFAULT 0,
    attempts            integer     NOT NULL DEFAULT 0,
    max_attempts        integer     NOT NULL DEFAULT 3,
    run_at              timestamptz NOT NULL DEFAULT now(),
    idempotency_key     text,
    cancel_requested    boolean     NOT NULL DEFAULT false,
    lease_owner         text,
    lease_token         uuid,
    lease_expires_at    timestamptz,
    retry_delay_seconds double precision,
    last_error          text,
    errors              jsonb       NOT NULL DEFAULT '[]'::jsonb,
    result              jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz
"""

# A finished job keeps no lease (as today: completion clears the token and the expiry).
_HISTORY_COLS = (
    "id, kind, queue, payload, status, priority, attempts, max_attempts, run_at,"
    " idempotency_key, cancel_requested, lease_owner, lease_token, lease_expires_at,"
    " retry_delay_seconds, last_error, errors, result, created_at, updated_at, started_at,"
    " finished_at"
)


def _live_ddl(list_index: bool, *, hot_claim: bool = False, fillfactor: int = 80) -> str:
    if hot_claim:
        # No index mentions a column the claim or a heartbeat changes (status, lease_*), so
        # both are HOT updates: no index entries at all. The claim index then also holds
        # running rows (the claim skips them), and rescue has no index of its own.
        return f"""
CREATE TABLE live ({_COLUMNS}, PRIMARY KEY (id)) WITH (
    fillfactor = 80, autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_limit = 2000);
CREATE INDEX live_claim_idx ON live (queue, priority, run_at, id);
"""
    return f"""
CREATE TABLE live ({_COLUMNS}, PRIMARY KEY (id)) WITH (
    fillfactor = {fillfactor}, autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_limit = 2000);
CREATE INDEX live_claim_idx ON live (queue, priority, run_at, id)
    WHERE status IN ('queued', 'retrying');
CREATE INDEX live_lease_idx ON live (lease_expires_at) WHERE status = 'running';
{"CREATE INDEX live_created_idx ON live (created_at DESC, id DESC);" if list_index else ""}
"""


def _history_ddl(indexes: list[str]) -> str:
    today = datetime.now(UTC).date()
    parts = "\n".join(
        f"CREATE TABLE history_{d:%Y%m%d} PARTITION OF history"
        f" FOR VALUES FROM ('{d}') TO ('{d + timedelta(days=1)}');"
        for d in (today - timedelta(days=1), today, today + timedelta(days=1))
    )
    idx = "\n".join(f"CREATE INDEX ON history {ix};" for ix in indexes)
    return f"""
CREATE TABLE history ({_COLUMNS}) PARTITION BY RANGE (finished_at);
{parts}
{idx}
"""


_HISTORY_ALL = [
    "(id)",
    "(created_at DESC, id DESC)",
    "(status, created_at DESC, id DESC)",
    "(kind, created_at DESC, id DESC)",
    "(queue, created_at DESC, id DESC)",
]
_HISTORY_DESIGN = [
    "(id)",
    "(created_at DESC, id DESC)",
    "(kind, created_at DESC, id DESC)",
    "(queue, created_at DESC, id DESC)",
    "(status, created_at DESC, id DESC) WHERE status <> 'succeeded'",
]
_HISTORY_MIN = ["(id)", "(created_at DESC, id DESC)"]
# The same keys ascending: inserts land at the right edge, where PostgreSQL splits a full
# page 90/10 instead of 50/50 (a DESC index takes every insert at its left edge). Backward
# index scans serve "newest first" just as well.
_HISTORY_BY_ID_ASC = [
    "(id)",
    "(kind, id)",
    "(queue, id)",
    "(status, id) WHERE status <> 'succeeded'",
]
# Newest first by id (UUIDv7: creation order to the millisecond) instead of created_at: the id
# index serves lookups and the unfiltered list at once.
_HISTORY_BY_ID = [
    "(id DESC)",
    "(kind, id DESC)",
    "(queue, id DESC)",
    "(status, id DESC) WHERE status <> 'succeeded'",
]

_LH_INSERT = """
INSERT INTO live (kind, queue, payload, priority, max_attempts, run_at, idempotency_key)
SELECT k, qu, p::jsonb, pr, ma, coalesce(ra, now()), ik
FROM unnest($1::text[], $2::text[], $3::text[], $4::smallint[], $5::int[],
            $6::timestamptz[], $7::text[]) AS t(k, qu, p, pr, ma, ra, ik)
"""

_LH_CLAIM = """
WITH picked AS (
    SELECT id FROM live
    WHERE status IN ('queued', 'retrying') AND run_at <= now()
      AND kind = ANY($2::text[]) AND queue = ANY($3::text[])
    ORDER BY priority, run_at, id
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE live AS j
SET status = 'running', attempts = j.attempts + 1, started_at = now(), updated_at = now(),
    lease_owner = $1, lease_token = gen_random_uuid(),
    lease_expires_at = now() + make_interval(secs => $5)
FROM picked WHERE j.id = picked.id
RETURNING j.id, j.kind, j.payload, j.attempts, j.lease_token
"""

_LH_COMPLETE = f"""
WITH done AS (
    DELETE FROM live AS j
    USING unnest($1::uuid[], $2::uuid[], $3::text[]) AS r(id, token, result)
    WHERE j.id = r.id AND j.lease_token = r.token AND j.status = 'running'
    RETURNING j.*, r.result AS new_result
)
INSERT INTO history ({_HISTORY_COLS})
SELECT id, kind, queue, payload, 'succeeded', priority, attempts, max_attempts, run_at,
       idempotency_key, cancel_requested, lease_owner, NULL, NULL, retry_delay_seconds,
       last_error, errors, new_result::jsonb, created_at, now(), started_at, now()
FROM done
RETURNING id
"""


LAYOUTS: dict[str, dict[str, Any]] = {
    "v2": {"ddl": "", "insert": None},
    "v2_slim": {
        "ddl": "DROP INDEX jobs_created_idx, jobs_status_created_idx, jobs_kind_created_idx,"
        " jobs_queue_created_idx, jobs_finished_idx;",
        "insert": None,
    },
    "lh_full": {"ddl": _live_ddl(True) + _history_ddl(_HISTORY_ALL), "insert": _LH_INSERT},
    "lh_design": {"ddl": _live_ddl(True) + _history_ddl(_HISTORY_DESIGN), "insert": _LH_INSERT},
    "lh_by_id": {"ddl": _live_ddl(False) + _history_ddl(_HISTORY_BY_ID), "insert": _LH_INSERT},
    "lh_hot": {
        "ddl": _live_ddl(False, hot_claim=True) + _history_ddl(_HISTORY_BY_ID),
        "insert": _LH_INSERT,
    },
    "lh_by_id_ff50": {
        "ddl": _live_ddl(False, fillfactor=50) + _history_ddl(_HISTORY_BY_ID),
        "insert": _LH_INSERT,
    },
    "lh_by_id_ff30": {
        "ddl": _live_ddl(False, fillfactor=30) + _history_ddl(_HISTORY_BY_ID),
        "insert": _LH_INSERT,
    },
    "lh_asc": {
        "ddl": _live_ddl(False, fillfactor=50) + _history_ddl(_HISTORY_BY_ID_ASC),
        "insert": _LH_INSERT,
    },
    "lh_asc_copy": {
        "ddl": _live_ddl(False, fillfactor=50) + _history_ddl(_HISTORY_BY_ID_ASC),
        "insert": _LH_INSERT,
        "copy": True,
    },
    "lh_min": {"ddl": _live_ddl(False) + _history_ddl(_HISTORY_MIN), "insert": _LH_INSERT},
}


async def run(admin: str, a: argparse.Namespace) -> None:
    names = [x for x in (a.layouts.split(",") if a.layouts else LAYOUTS) if x]
    for round_no in range(a.rounds):
        # Alternate the order between rounds: the machine is shared and drifts.
        for name in names if round_no % 2 == 0 else reversed(names):
            async with fresh_db(admin, "layout") as dsn:
                rec = await run_layout(dsn, name, a.layout_n)
            emit({"bench": "storage_layout", "layout": name, "round": round_no + 1, **rec})


def uuid7(ms: int) -> uuid.UUID:
    """A UUIDv7 for the millisecond `ms`, made by the client (as jobq_uuid_v7 in SQL)."""
    raw = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    raw[6] = (raw[6] & 0x0F) | 0x70
    raw[8] = (raw[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(raw))


async def copy_jobs(conn: asyncpg.Connection, start: int, k: int) -> None:
    """The bulk insert as COPY with ids made by the client: PostgreSQL writes the heap with
    one multi-insert record per page instead of one record per row. Possible once keyed
    jobs no longer need ON CONFLICT on the job table (keys in their own table)."""
    ms = time.time_ns() // 1_000_000
    rows = [(uuid7(ms), "noop", "default", f'{{"i": {start + i}}}') for i in range(k)]
    await conn.copy_records_to_table(
        "live", records=rows, columns=["id", "kind", "queue", "payload"]
    )
    await conn.execute("SELECT pg_notify('jobq_jobs', 'default')")


async def run_layout(dsn: str, name: str, n: int) -> dict[str, Any]:
    layout = LAYOUTS[name]
    conn = await asyncpg.connect(dsn)
    try:
        if layout["ddl"]:
            await conn.execute(layout["ddl"])
        one_table = layout["insert"] is None
        insert = q_enqueue._INSERT_MANY if one_table else layout["insert"]
        claim = q_leases._CLAIM if one_table else _LH_CLAIM
        complete = q_leases._COMPLETE_MANY if one_table else _LH_COMPLETE
        await conn.execute("CHECKPOINT")
        p0 = await wal_position(conn)
        t0 = time.monotonic()
        for s in range(0, n, CHUNK):
            k = min(CHUNK, n - s)
            args: list[Any] = [
                ["noop"] * k,
                ["default"] * k,
                [f'{{"i": {s + i}}}' for i in range(k)],
                [0] * k,
                [3] * k,
                [None] * k,
                [None] * k,
            ]
            if one_table:
                args.append([None] * k)  # request_fingerprint
            async with conn.transaction():
                if layout.get("copy"):
                    await copy_jobs(conn, s, k)
                else:
                    await conn.execute(insert, *args)
        t1 = time.monotonic()
        p1 = await wal_position(conn)
        await conn.execute("ANALYZE")
        p1b = await wal_position(conn)
        t2 = time.monotonic()
        finished = 0
        while True:
            rows = await conn.fetch(claim, "layouts", ["noop"], ["default"], BATCH, 30.0)
            if not rows:
                break
            ids = [row["id"] for row in rows]
            toks = [row["lease_token"] for row in rows]
            done = await conn.fetch(complete, ids, toks, ["null"] * len(ids))
            finished += len(done)
        t3 = time.monotonic()
        p2 = await wal_position(conn)
        await conn.execute("VACUUM")
        p3 = await wal_position(conn)
        phases = {
            "enqueue": await wal_between(conn, p0, p1),
            "drain": await wal_between(conn, p1b, p2),
            "vacuum": await wal_between(conn, p2, p3),
        }
        by_rel = await wal_by_relation(conn, p1b["lsn"], p2["lsn"])
        by_type = await wal_by_record_type(conn, p1b["lsn"], p2["lsn"])
        sizes = await conn.fetch(
            """
            SELECT c.relname, pg_relation_size(c.oid) AS bytes
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'i')
              AND pg_relation_size(c.oid) > 0
            """
        )
    finally:
        await conn.close()
    life = phases["enqueue"]["bytes"] + phases["drain"]["bytes"]
    enq, drain = phases["enqueue"]["bytes"] / n, phases["drain"]["bytes"] / n
    log(
        f"layout {name}: {life / n:.0f} WAL bytes/job (enqueue {enq:.0f}, drain {drain:.0f}),"
        f" drain {n / (t3 - t2):,.0f} jobs/s"
    )
    return {
        "n": n,
        "finished": finished,
        "bytes_per_job": r(life / n),
        "enqueue_bytes_per_job": r(phases["enqueue"]["bytes"] / n),
        "drain_bytes_per_job": r(phases["drain"]["bytes"] / n),
        "vacuum_bytes_per_job": r(phases["vacuum"]["bytes"] / n),
        "drain_records_per_job": r(phases["drain"]["records"] / n, 2),
        "drain_fpi_per_job": r(phases["drain"]["fpi"] / n, 3),
        "enqueue_rows_per_s": r(n / (t1 - t0)),
        "drain_jobs_per_s": r(n / (t3 - t2)),
        "drain_by_relation_bytes_per_job": (
            {k: r(v / n) for k, v in by_rel.items() if v / n >= 1.0} if by_rel else None
        ),
        "drain_by_record_type_bytes_per_job": (
            {k: r(v / n) for k, v in by_type.items() if v / n >= 1.0} if by_type else None
        ),
        "relation_kb_after_vacuum": {row["relname"]: row["bytes"] // 1024 for row in sizes},
        "ok": finished == n,
    }
