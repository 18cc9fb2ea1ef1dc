"""Test fixtures: a real PostgreSQL (DATABASE_URL, or an embedded server), one database per
test module cloned from a migrated template, and an empty jobs table for every test."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from jobq import db, schema
from jobq.embedded import TEST_SETTINGS, EmbeddedPostgres
from jobq.queue import Queue

# Per run: suites of two checkouts may share one server (DATABASE_URL) at the same time, and
# each must migrate its template with its own migrations.
TEMPLATE = "jobq_test_template_" + uuid.uuid4().hex[:8]


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A superuser DSN on the server the suite owns (or DATABASE_URL's)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"), settings=TEST_SETTINGS)
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()


@pytest.fixture(scope="session")
async def template_dsn(admin_dsn: str) -> AsyncIterator[str]:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await conn.close()
    dsn = with_database(admin_dsn, TEMPLATE)
    tconn = await db.connect(dsn)
    try:
        await schema.migrate(tconn)
    finally:
        await tconn.close()
    yield dsn
    await drop_database(admin_dsn, TEMPLATE)


async def create_database(
    admin_dsn: str, label: str, *, template: str = TEMPLATE, options: str = ""
) -> str:
    name = (
        "jobq_test_" + re.sub(r"[^a-z0-9]+", "_", label.lower())[-30:] + "_" + uuid.uuid4().hex[:6]
    )
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name} TEMPLATE {template} {options}")
    finally:
        await conn.close()
    return name


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def dsn(
    admin_dsn: str, template_dsn: str, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """A database of this test module's own, migrated."""
    name = await create_database(admin_dsn, Path(str(request.node.path)).stem)
    try:
        yield with_database(admin_dsn, name)
    finally:
        await drop_database(admin_dsn, name)


@pytest.fixture(scope="module")
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(dsn, min_size=1, max_size=20)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def queue(pool: asyncpg.Pool) -> Queue:
    """The queue core over no jobs: live, history, their keys and the rollups counting them
    (TRUNCATE fires no row or statement trigger, so the rollups are emptied with the jobs)."""
    await pool.execute(
        "TRUNCATE jobs, jobs_history, jobq_idempotency_keys, jobq_counts, jobq_count_deltas,"
        " jobq_finished_minutes, jobq_flow_controls, jobq_flow_key_buckets, jobq_flow_cursors"
    )
    return Queue(pool)
