"""Schema migrations: versioned, recorded, safe when many processes start at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from jobq import db, schema
from jobq.queue import flow
from tests.conftest import drop_database, with_database


@pytest.fixture
async def empty_dsn(admin_dsn: str) -> AsyncIterator[str]:
    name = "jobq_test_empty_migrations_" + uuid.uuid4().hex[:6]
    conn = await asyncpg.connect(admin_dsn)
    await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    await conn.execute(f"CREATE DATABASE {name}")
    await conn.close()
    yield with_database(admin_dsn, name)
    await drop_database(admin_dsn, name)


async def test_concurrent_migrations_apply_each_version_once(empty_dsn: str) -> None:
    conns = [await db.connect(empty_dsn) for _ in range(5)]
    try:
        results = await asyncio.gather(*(schema.migrate(c) for c in conns))
        versions = [m.version for m in schema.available()]
        assert sorted(v for r in results for v in r) == versions
        assert await schema.applied(conns[0]) == set(versions)
    finally:
        for c in conns:
            await c.close()


async def test_migrating_an_up_to_date_database_does_nothing(empty_dsn: str) -> None:
    conn = await db.connect(empty_dsn)
    try:
        await schema.migrate(conn)
        assert await schema.migrate(conn) == []
    finally:
        await conn.close()


# Every object a migration can make, as text that differs when the object differs.
_SCHEMA_SNAPSHOT = """
SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' '
       || is_nullable || ' ' || coalesce(column_default, '')
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'function ' || pg_get_functiondef(p.oid)
FROM pg_proc AS p WHERE pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal
UNION ALL
SELECT 'relation ' || relname || ' ' || relkind::text || ' '
       || coalesce(array_to_string(reloptions, ','), '')
FROM pg_class WHERE relnamespace = 'public'::regnamespace
ORDER BY 1
"""


async def test_pre_deploy_steps_give_the_same_schema_before_or_after_post_deploy_ones(
    admin_dsn: str,
) -> None:
    # `jobq migrate --pre-deploy` applies pre-deploy steps numbered after a pending post-deploy
    # one: the schema must not depend on which ran first.
    snapshots = []
    for pre_deploy_first in (False, True):
        name = "jobq_test_migration_order_" + uuid.uuid4().hex[:6]
        admin = await asyncpg.connect(admin_dsn)
        await admin.execute(f"CREATE DATABASE {name}")
        await admin.close()
        conn = await db.connect(with_database(admin_dsn, name))
        try:
            if pre_deploy_first:
                await schema.migrate(conn, pre_deploy=True)
            await schema.migrate(conn)
            snapshots.append([r[0] for r in await conn.fetch(_SCHEMA_SNAPSHOT)])
        finally:
            await conn.close()
            await drop_database(admin_dsn, name)
    assert snapshots[0] == snapshots[1]


def test_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in schema.available()]
    assert versions == list(range(1, len(versions) + 1))


def test_the_newest_migration_defining_the_limited_claim_states_the_code_s_statements() -> None:
    # The limited claim runs as jobq_claim_limited, built from the statements in jobq.queue.flow:
    # a change to them that no migration carries would not run.
    defining = [m for m in schema.available() if "FUNCTION\n    jobq_claim_limited(" in m.sql]
    assert defining and defining[-1].sql.endswith(flow.claim_limited_function())


async def _migrate_through(conn: asyncpg.Connection, version: int) -> None:
    """Apply migrations up to `version` only, as an older release would have."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS jobq_schema_migrations (version integer PRIMARY KEY,"
        " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for m in schema.available():
        if m.version <= version:
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO jobq_schema_migrations (version, name) VALUES ($1, $2)",
                    m.version,
                    m.name,
                )


async def _claim_index_is_valid(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT i.indisvalid AND NOT i.indisunique FROM pg_index AS i"
            " WHERE i.indexrelid = 'jobs_queue_claim_idx'::regclass"
        )
    )


async def test_upgrading_a_populated_database_keeps_its_jobs_and_builds_the_claim_index(
    empty_dsn: str,
) -> None:
    conn = await db.connect(empty_dsn)
    try:
        await _migrate_through(conn, 2)
        await conn.execute(
            "INSERT INTO jobs (kind, max_attempts) SELECT 'echo', 5 FROM generate_series(1, 500)"
        )
        assert await schema.migrate(conn) == [m.version for m in schema.available()][2:]
        assert await _claim_index_is_valid(conn)
        assert await conn.fetchval("SELECT to_regclass('jobs_claim_idx')") is None
        assert await conn.fetchval("SELECT count(*) FROM jobs WHERE max_attempts = 5") == 500
    finally:
        await conn.close()


async def test_an_index_build_a_crash_left_invalid_is_built_again(empty_dsn: str) -> None:
    conn = await db.connect(empty_dsn)
    try:
        await _migrate_through(conn, 2)
        await conn.execute("INSERT INTO jobs (kind) SELECT 'echo' FROM generate_series(1, 2)")
        # A concurrent build that fails leaves an invalid index behind under the final name.
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY jobs_queue_claim_idx ON jobs (queue)"
                " WHERE status IN ('queued', 'retrying')"
            )
        assert await schema.migrate(conn) == [m.version for m in schema.available()][2:]
        assert await _claim_index_is_valid(conn)
    finally:
        await conn.close()
