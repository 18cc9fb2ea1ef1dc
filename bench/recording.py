"""A connection that keeps what it runs: the benchmarks EXPLAIN, or replay in pgbench, exactly
the statements the queue core runs, however it builds them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg


class Recording:
    """A connection that runs what it is given and keeps each statement with its arguments:
    the EXPLAINs are of exactly what the queue core runs, however it builds its SQL."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.statements: list[tuple[str, tuple[Any, ...]]] = []

    def _keep(self, sql: str, args: tuple[Any, ...]) -> None:
        self.statements.append((sql, args))

    async def fetch(self, sql: str, *args: Any, **kw: Any) -> list[asyncpg.Record]:
        self._keep(sql, args)
        return await self.conn.fetch(sql, *args, **kw)

    async def fetchrow(self, sql: str, *args: Any, **kw: Any) -> Any:
        self._keep(sql, args)
        return await self.conn.fetchrow(sql, *args, **kw)

    async def fetchval(self, sql: str, *args: Any, **kw: Any) -> Any:
        self._keep(sql, args)
        return await self.conn.fetchval(sql, *args, **kw)

    async def execute(self, sql: str, *args: Any, **kw: Any) -> str:
        self._keep(sql, args)
        return await self.conn.execute(sql, *args, **kw)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Recording]:
        yield self

    def __getattr__(self, name: str) -> Any:  # transaction(), ... of the real connection
        return getattr(self.conn, name)

    def take(self) -> list[tuple[str, tuple[Any, ...]]]:
        out, self.statements = self.statements, []
        # Wake-ups and locks are not what is measured.
        return [(q, a) for q, a in out if "pg_notify($1" not in q and "advisory" not in q]
