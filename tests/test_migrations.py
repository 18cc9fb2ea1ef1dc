"""Schema migrations: versioned, recorded, safe when many processes start at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from jobq import db, schema
from tests.conftest import drop_database, with_database


@pytest.fixture
async def empty_dsn(admin_dsn: str) -> AsyncIterator[str]:
    name = "jobq_test_empty_migrations"
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


def test_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in schema.available()]
    assert versions == list(range(1, len(versions) + 1))
