"""Connections: which database to use, the connection pool, and how outages look.

Every connection jobq opens goes through `connect` or `create_pool`, which apply the two
things each statement relies on wherever the server is reached through:

- READ COMMITTED. Claims (SKIP LOCKED), lease-fenced writes and cancels re-check a row that
  a concurrent transaction changed; under REPEATABLE READ or SERIALIZABLE they would fail with
  serialization errors instead. A direct connection asks for it as a startup parameter (free).
  A pooler refuses unknown startup parameters and would leak a session SET to other clients,
  so there jobq reads the server's default once per pool and, only when it is not read
  committed, runs each statement in an explicit READ COMMITTED transaction (two extra round
  trips per statement; `ALTER ROLE ... SET default_transaction_isolation = 'read committed'`
  avoids that cost). Every transaction jobq opens names READ COMMITTED explicitly.
- The pooler mode (`JOBQ_POOLER`): `transaction` turns asyncpg's statement cache off, because
  PgBouncer's transaction pooling hands each transaction to any server connection, where a
  named prepared statement of another process may hold the same name. Unnamed statements are
  parsed and executed within one exchange, so they stay on one server connection.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import asyncpg
import asyncpg.transaction
import orjson

from jobq.embedded import EmbeddedPostgres, EmbeddedPostgresError
from jobq.settings import POOLER_MODES, Settings, pooler_from_env

__all__ = [
    "POOLER_MODES",
    "Connection",
    "EmbeddedPostgresError",
    "connect",
    "create_pool",
    "database",
    "in_recovery",
    "is_read_only",
    "is_unavailable",
]

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

READ_COMMITTED = "read committed"

# Default bound on every statement of a pool (asyncpg's command_timeout: the client gives up
# and cancels the statement on the server, which works through PgBouncer too, unlike a
# statement_timeout startup parameter). Callers with tighter needs pass their own.
COMMAND_TIMEOUT_SECONDS = 60.0


def is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, UNAVAILABLE_ERRORS)


async def in_recovery(executor: asyncpg.Pool | asyncpg.Connection) -> bool:
    """True on a hot standby: it serves reads and refuses every write."""
    return bool(await executor.fetchval("SELECT pg_is_in_recovery()"))


def is_read_only(exc: BaseException) -> bool:
    """A write reached a server that only reads: a hot standby, or a read-only session."""
    return isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError)


class Connection(asyncpg.Connection):
    """An asyncpg connection whose statements and transactions run READ COMMITTED."""

    # Set (by `_Setup`) when the session default is another level and cannot be changed.
    _jobq_wrap_statements = False
    # The pooler mode it was opened with: under transaction pooling no session setting may
    # be left behind (the migration runner reads it).
    _jobq_pooler = "none"

    def transaction(
        self,
        *,
        isolation: asyncpg.transaction._IsolationLevels | None = None,
        readonly: bool = False,
        deferrable: bool = False,
    ) -> asyncpg.transaction.Transaction:
        return super().transaction(
            isolation=isolation or "read_committed", readonly=readonly, deferrable=deferrable
        )

    # Every extended-protocol statement (fetch*, execute with arguments) passes through here.
    async def _execute(self, query: str, args: Any, limit: int, timeout: Any, **kw: Any) -> Any:
        run = super()._execute  # type: ignore[misc]
        if not self._jobq_wrap_statements or self.is_in_transaction():
            return await run(query, args, limit, timeout, **kw)
        # Simple-query BEGIN/COMMIT do not come back through _execute.
        await self.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        try:
            result = await run(query, args, limit, timeout, **kw)
        except BaseException:
            if not self.is_closed():
                with contextlib.suppress(Exception):
                    await self.execute("ROLLBACK")
            raise
        await self.execute("COMMIT")
        return result


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


async def init_connection(conn: asyncpg.Connection) -> None:
    # orjson for jsonb both ways: the payload and result codecs are on every job's path.
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")
    await conn.set_type_codec("json", encoder=_dumps, decoder=orjson.loads, schema="pg_catalog")


_isolation_warned = False


class _Setup:
    """Per pool (or single connection): the options for asyncpg, and the per-connection init,
    which learns the server's default isolation once when it cannot be set at start-up."""

    def __init__(self, pooler: str | None, server_settings: dict[str, str] | None) -> None:
        self.pooler = pooler or pooler_from_env()
        if self.pooler not in POOLER_MODES:
            raise ValueError(f"pooler must be one of {', '.join(POOLER_MODES)}")
        self.server_settings = dict(server_settings or {})
        self.wrap: bool | None = None
        if self.pooler == "none":
            self.server_settings["default_transaction_isolation"] = READ_COMMITTED
            self.wrap = False

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "server_settings": self.server_settings,
            "connection_class": Connection,
        }
        if self.pooler == "transaction":
            opts["statement_cache_size"] = 0
        return opts

    async def init(self, conn: asyncpg.Connection) -> None:
        await init_connection(conn)
        if self.wrap is None:
            # reset_val: the session default (database, role, server), not a SET another
            # client of the pooler may have left on this server connection.
            default = await conn.fetchval(
                "SELECT reset_val FROM pg_settings WHERE name = 'default_transaction_isolation'"
            )
            self.wrap = default != READ_COMMITTED
            global _isolation_warned
            if self.wrap and not _isolation_warned:
                _isolation_warned = True
                log.warning(
                    "the database's default_transaction_isolation is %r: jobq runs each "
                    "statement in an explicit READ COMMITTED transaction (two extra round "
                    "trips); ALTER ROLE <jobq's role> SET default_transaction_isolation = "
                    "'read committed' removes that cost",
                    default,
                )
        if isinstance(conn, Connection):
            conn._jobq_wrap_statements = self.wrap
            conn._jobq_pooler = self.pooler


async def connect(
    dsn: str,
    *,
    pooler: str | None = None,
    server_settings: dict[str, str] | None = None,
    **kwargs: Any,
) -> Connection:
    """One connection (LISTEN, migrations): READ COMMITTED, pooler-safe, orjson codecs."""
    setup = _Setup(pooler, server_settings)
    conn: Connection = await asyncpg.connect(dsn, **setup.options(), **kwargs)
    try:
        await setup.init(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


async def _reset_connection(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset costs a round trip on every release (RESET ALL, UNLISTEN *,
    # advisory unlocks). Pooled connections never change session state: LISTEN and advisory
    # locks use dedicated connections. Only an unfinished transaction needs undoing.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    pooler: str | None = None,
    server_settings: dict[str, str] | None = None,
    **kwargs: Any,
) -> asyncpg.Pool:
    setup = _Setup(pooler, server_settings)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=setup.init,
        reset=_reset_connection,
        # A restarted server invalidates every connection; recycle idle ones regularly.
        max_inactive_connection_lifetime=60.0,
        **setup.options(),
        **{"command_timeout": COMMAND_TIMEOUT_SECONDS, **kwargs},
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
    # Not INFO: every one-shot command would print it. `jobq dev` names the database itself.
    log.debug("using the embedded PostgreSQL in %s", server.pgdata)
    try:
        yield dsn
    finally:
        server.stop()
