"""Which driver a connection belongs to, and how to run one statement on it.

Drivers are recognised by the modules already imported (`sys.modules`): jobq imports none of
them itself, so each stays an optional extra (`jobq[psycopg]`, `jobq[sqlalchemy]`; Django
brings its own driver).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import asyncpg.pool

from jobq.queue.inserts import Row, Statement
from jobq.txn.render import render

AsyncFetch = Callable[[Statement], Awaitable[Sequence[Row]]]
SyncFetch = Callable[[Statement], Sequence[Row]]

_ASYNC_HINT = (
    "an asyncpg connection, a psycopg AsyncConnection, or a SQLAlchemy AsyncSession or "
    "AsyncConnection"
)
_SYNC_HINT = (
    "a psycopg Connection, a SQLAlchemy Session or Connection, or Django's django.db.connection"
)


def asynchronous(conn: Any) -> AsyncFetch:
    """How to run a statement on an async connection; TypeError for anything else."""
    if isinstance(conn, asyncpg.Connection | asyncpg.pool.PoolConnectionProxy):
        return _asyncpg(conn)
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(conn, psycopg.AsyncConnection):
        return _psycopg_async(conn)
    sa_async = sys.modules.get("sqlalchemy.ext.asyncio")
    if sa_async is not None and isinstance(conn, sa_async.AsyncSession | sa_async.AsyncConnection):
        return _sqlalchemy_async(conn)
    if _sync_kind(conn) is not None:
        raise TypeError(f"{type(conn).__name__} is a sync connection: use jobq.txn.enqueue_sync")
    raise TypeError(f"jobq.txn.enqueue needs {_ASYNC_HINT}, got {type(conn).__name__}")


def sync(conn: Any) -> SyncFetch:
    """How to run a statement on a sync connection; TypeError for anything else."""
    kind = _sync_kind(conn)
    if kind == "psycopg":
        return _psycopg_sync(conn)
    if kind == "sqlalchemy":
        return _sqlalchemy_sync(conn)
    if kind == "django":
        return _django(conn)
    raise TypeError(f"jobq.txn.enqueue_sync needs {_SYNC_HINT}, got {type(conn).__name__}")


def _sync_kind(conn: Any) -> str | None:
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(conn, psycopg.Connection):
        return "psycopg"
    orm = sys.modules.get("sqlalchemy.orm")
    engine = sys.modules.get("sqlalchemy.engine")
    if (orm is not None and isinstance(conn, orm.Session)) or (
        engine is not None and isinstance(conn, engine.Connection)
    ):
        return "sqlalchemy"
    base = sys.modules.get("django.db.backends.base.base")
    if base is not None and isinstance(conn, base.BaseDatabaseWrapper):
        return "django"
    # django.db.connection: a proxy to the current thread's connection of the default alias.
    proxy = sys.modules.get("django.utils.connection")
    if proxy is not None and isinstance(conn, proxy.ConnectionProxy):
        return "django"
    return None


# -- asyncpg --------------------------------------------------------------------------------


def _asyncpg(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> AsyncFetch:
    async def fetch(statement: Statement) -> Sequence[Row]:
        return await conn.fetch(statement.sql, *statement.args)

    return fetch


# -- psycopg 3 ------------------------------------------------------------------------------


def _psycopg_async(conn: Any) -> AsyncFetch:
    from psycopg.rows import dict_row

    async def fetch(statement: Statement) -> Sequence[Row]:
        sql, params = render(statement, "format")
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)
            rows: list[Row] = await cur.fetchall()
            return rows

    return fetch


def _psycopg_sync(conn: Any) -> SyncFetch:
    from psycopg.rows import dict_row

    def fetch(statement: Statement) -> Sequence[Row]:
        sql, params = render(statement, "format")
        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, params)
            rows: list[Row] = cur.fetchall()
            return rows

    return fetch


# -- SQLAlchemy 2 ---------------------------------------------------------------------------


def _sqlalchemy_sync(conn: Any) -> SyncFetch:
    def fetch(statement: Statement) -> Sequence[Row]:
        # A Session's connection() joins (or begins) the session's transaction.
        connection = conn.connection() if hasattr(conn, "get_bind") else conn
        sql, params = render(statement, connection.dialect.paramstyle)
        rows: list[Row] = list(connection.exec_driver_sql(sql, params).mappings().all())
        return rows

    return fetch


def _sqlalchemy_async(conn: Any) -> AsyncFetch:
    async def fetch(statement: Statement) -> Sequence[Row]:
        connection = await conn.connection() if hasattr(conn, "get_bind") else conn
        sql, params = render(statement, connection.dialect.paramstyle)
        result = await connection.exec_driver_sql(sql, params)
        rows: list[Row] = list(result.mappings().all())
        return rows

    return fetch


# -- Django ---------------------------------------------------------------------------------


def _django(conn: Any) -> SyncFetch:
    if conn.vendor != "postgresql":
        raise TypeError(f"jobq needs PostgreSQL; this Django connection is {conn.vendor}")

    def fetch(statement: Statement) -> Sequence[Row]:
        sql, params = render(statement, "format")
        with conn.cursor() as cur:
            cur.execute(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    return fetch
