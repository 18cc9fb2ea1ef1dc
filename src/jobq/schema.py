"""Applies the versioned SQL migrations shipped in `jobq/migrations/`, once each, in order."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger("jobq.schema")

# Every process that starts at once takes this lock, so exactly one applies each migration.
_MIGRATION_LOCK_KEY = 0x6A6F6271_0001  # "jobq", 1

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

# A migration whose first line is this runs outside a transaction, one statement at a time
# (`CREATE INDEX CONCURRENTLY` cannot run in one). Its statements end with `;` at the end of a
# line and must be safe to run again: a crash can leave it half applied.
_OUTSIDE_TRANSACTION = "-- jobq:outside-transaction"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def outside_transaction(self) -> bool:
        return self.sql.startswith(_OUTSIDE_TRANSACTION)

    def statements(self) -> list[str]:
        """The statements of the migration, without comment-only lines."""
        code = "\n".join(
            line for line in self.sql.splitlines() if not line.lstrip().startswith("--")
        )
        return [part.strip() for part in re.split(r";\s*$", code, flags=re.M) if part.strip()]


def available() -> list[Migration]:
    found = []
    for entry in resources.files("jobq.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda m: m.version)


async def applied(conn: asyncpg.Connection) -> set[int]:
    exists = await conn.fetchval("SELECT to_regclass('jobq_schema_migrations') IS NOT NULL")
    if not exists:
        return set()
    return {r["version"] for r in await conn.fetch("SELECT version FROM jobq_schema_migrations")}


async def migrate(
    conn: asyncpg.Connection, *, progress: Callable[[Migration], None] | None = None
) -> list[int]:
    """Apply pending migrations; return the versions applied by this call."""
    done: list[int] = []
    # Polled, not waited for: a waiting `pg_advisory_lock` call holds a snapshot, and
    # `CREATE INDEX CONCURRENTLY` in the holder's migration waits for every older snapshot.
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _MIGRATION_LOCK_KEY):  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS jobq_schema_migrations (
                version    integer     PRIMARY KEY,
                name       text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        already = await applied(conn)
        for migration in available():
            if migration.version in already:
                continue
            if progress is not None:
                progress(migration)
            if migration.outside_transaction:
                for statement in migration.statements():
                    await conn.execute(statement)
            async with conn.transaction():
                if not migration.outside_transaction:
                    await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO jobq_schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            if progress is None:  # a caller with a progress callback reports each step itself
                log.info("applied migration %04d_%s", migration.version, migration.name)
            done.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
    return done
