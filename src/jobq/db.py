"""Connections: which database to use, the connection pool, and how outages look."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson

from jobq.embedded import EmbeddedPostgres, EmbeddedPostgresError

__all__ = ["EmbeddedPostgresError", "connect", "create_pool", "database", "is_unavailable"]
from jobq.settings import Settings

log = logging.getLogger("jobq.db")

# Errors that mean "the database is unreachable or restarting", as opposed to a bad statement.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    TimeoutError,
)


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, UNAVAILABLE_ERRORS)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def init_connection(conn: asyncpg.Connection) -> None:
    # orjson for jsonb both ways: the payload and result codecs are on every job's path.
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(dsn, **kwargs)
    await init_connection(conn)
    return conn


async def _reset_connection(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset costs a round trip on every release (RESET ALL, UNLISTEN *,
    # advisory unlocks). Pooled connections never change session state: LISTEN and advisory
    # locks use dedicated connections. Only an unfinished transaction needs undoing.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(
    dsn: str, *, min_size: int = 2, max_size: int = 10, **kwargs: Any
) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init_connection,
        reset=_reset_connection,
        # A restarted server invalidates every connection; recycle idle ones regularly.
        max_inactive_connection_lifetime=60.0,
        **kwargs,
    )
    assert pool is not None
    return pool


@contextlib.contextmanager
def database(
    settings: Settings, *, embedded_settings: dict[str, str] | None = None
) -> Iterator[str]:
    """Yield the DSN to use: DATABASE_URL, or an embedded server stopped on exit."""
    if settings.database_url:
        yield settings.database_url
        return
    server = EmbeddedPostgres(settings.data_dir, settings=embedded_settings)
    dsn = server.start()
    log.info("using the embedded PostgreSQL in %s", server.pgdata)
    try:
        yield dsn
    finally:
        server.stop()
