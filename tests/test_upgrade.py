"""Upgrading a populated schema-v3 database to the storage of #10 while version-3 processes run:
pre-deploy steps, a rolling deploy, post-deploy steps (docs/upgrade.md)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from jobq import db, schema
from tests.conftest import create_database, drop_database, with_database
from tests.test_cli import jobq

PRE_DEPLOY = [m.version for m in schema.available() if not m.post_deploy]
POST_DEPLOY = [m.version for m in schema.available() if m.post_deploy]


@contextlib.asynccontextmanager
async def _database(admin_dsn: str, label: str) -> AsyncIterator[str]:
    name = await create_database(admin_dsn, label, template="template0")
    try:
        yield with_database(admin_dsn, name)
    finally:
        await drop_database(admin_dsn, name)


@pytest.fixture
async def v3_dsn(admin_dsn: str, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A database at schema v3 (migrations 0001-0003), as version 3 left it."""
    async with _database(admin_dsn, request.node.name) as dsn:
        conn = await db.connect(dsn)
        try:
            assert await schema.migrate(conn, target=3) == [1, 2, 3]
        finally:
            await conn.close()
        yield dsn


async def test_a_fresh_install_applies_every_step(admin_dsn: str) -> None:
    async with _database(admin_dsn, "fresh_install") as dsn:
        conn = await db.connect(dsn)
        try:
            assert await schema.migrate(conn) == [m.version for m in schema.available()]
            assert all(done for _, done in await schema.status(conn))
        finally:
            await conn.close()


async def test_pre_deploy_stops_before_the_first_post_deploy_step(admin_dsn: str) -> None:
    async with _database(admin_dsn, "pre_deploy_only") as dsn:
        conn = await db.connect(dsn)
        try:
            assert await schema.migrate(conn, pre_deploy=True) == PRE_DEPLOY
            pending = [m.version for m, done in await schema.status(conn) if not done]
            assert pending == POST_DEPLOY
            assert await schema.migrate(conn, pre_deploy=True) == []
        finally:
            await conn.close()


async def test_this_version_needs_only_the_pre_deploy_steps(v3_dsn: str) -> None:
    conn = await db.connect(v3_dsn)
    try:
        assert [m.version for m in schema.pending_required(await schema.applied(conn))] == [
            v for v in PRE_DEPLOY if v > 3
        ]
        await schema.migrate(conn, pre_deploy=True)
        assert schema.pending_required(await schema.applied(conn)) == []
    finally:
        await conn.close()


async def test_the_command_line_refuses_a_database_without_the_pre_deploy_steps(
    v3_dsn: str,
) -> None:
    result = jobq("enqueue", "echo", env={"DATABASE_URL": v3_dsn})
    assert result.returncode == 1
    assert "the database schema is not up to date" in result.stderr
    assert "run `jobq migrate --pre-deploy`" in result.stderr


async def test_migrate_status_shows_each_step_its_kind_and_whether_applied(
    v3_dsn: str,
) -> None:
    result = jobq("migrate", "--status", env={"DATABASE_URL": v3_dsn})
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    for m in schema.available():
        kind = "post-deploy" if m.post_deploy else "pre-deploy"
        assert lines[m.label] == [kind, "applied" if m.version <= 3 else "pending"]


def test_a_statement_ends_at_a_semicolon_outside_dollar_quotes() -> None:
    migration = schema.Migration(
        8,
        "example",
        "-- jobq:outside-transaction\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$\n"
        "BEGIN\n"
        "    -- a comment; inside the body\n"
        "    RETURN 1;\n"
        "END\n"
        "$$;\n"
        "SELECT f();\n",
    )
    assert migration.statements() == [
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$\nBEGIN\n"
        "    -- a comment; inside the body\n    RETURN 1;\nEND\n$$",
        "SELECT f()",
    ]
