"""Applies the versioned SQL migrations shipped in `jobq/migrations/`, once each, in order."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger("jobq.schema")

# Every process that starts at once takes this lock, so exactly one applies each migration.
_MIGRATION_LOCK_KEY = 0x6A6F6271_0001  # "jobq", 1

_CREATE_VERSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS jobq_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

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
    conn: asyncpg.Connection,
    *,
    progress: Callable[[Migration], None] | None = None,
    connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
) -> list[int]:
    """Apply pending migrations; return the versions applied by this call.

    Safe when many processes migrate at once, directly or through any pooler: a step runs in
    one transaction holding a transaction-scoped advisory lock, so each version is applied
    once and no lock can outlive its transaction (a dead process, a pooled server
    connection). A step that must run outside a transaction (`CREATE INDEX CONCURRENTLY`) is
    claimed in `jobq_schema_claims` under that lock instead; the claimant runs it and records
    it, the others wait without holding a transaction (the index build waits for every older
    snapshot). `connect` opens a second connection that renews the claim during a long step;
    without it a claim is taken over after 60 s.
    """
    done: list[int] = []
    for migration in available():
        if migration.outside_transaction:
            applied_now = await _apply_outside_transaction(conn, migration, progress, connect)
        else:
            applied_now = await _apply_in_transaction(conn, migration, progress)
        if applied_now:
            if progress is None:  # a caller with a progress callback reports each step itself
                log.info("applied migration %04d_%s", migration.version, migration.name)
            done.append(migration.version)
    return done


async def _locked(conn: asyncpg.Connection, migration: Migration) -> bool:
    """Begin a transaction holding the migration lock; False (and no transaction) when
    `migration` was applied meanwhile.

    Polled, and between tries no transaction stays open: a waiting lock call, or a session
    idle in a transaction, holds a snapshot, and `CREATE INDEX CONCURRENTLY` in the holder's
    migration waits for every older snapshot.
    """
    while True:
        await conn.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        try:
            if await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY):
                await conn.execute(_CREATE_VERSIONS_TABLE)
                if await conn.fetchval(
                    "SELECT true FROM jobq_schema_migrations WHERE version = $1",
                    migration.version,
                ):
                    await conn.execute("COMMIT")
                    return False
                return True
        except BaseException:
            if not conn.is_closed():
                await conn.execute("ROLLBACK")
            raise
        await conn.execute("ROLLBACK")
        await asyncio.sleep(0.1)


async def _record(conn: asyncpg.Connection, migration: Migration) -> None:
    await conn.execute(
        "INSERT INTO jobq_schema_migrations (version, name) VALUES ($1, $2)",
        migration.version,
        migration.name,
    )


async def _apply_in_transaction(
    conn: asyncpg.Connection, migration: Migration, progress: Callable[[Migration], None] | None
) -> bool:
    if not await _locked(conn, migration):
        return False
    try:
        if progress is not None:
            progress(migration)
        await conn.execute(migration.sql)
        await _record(conn, migration)
    except BaseException:
        if not conn.is_closed():
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")
    return True


# A step outside a transaction is claimed in this table: the holder renews its claim while the
# statements run, and a claim not renewed for this long belonged to a process that died (the
# statements of such a step can run again).
_CLAIM_STALE_SECONDS = 60.0
_CREATE_CLAIMS_TABLE = """
CREATE TABLE IF NOT EXISTS jobq_schema_claims (
    version    integer     PRIMARY KEY,
    renewed_at timestamptz NOT NULL DEFAULT now()
)
"""


async def _apply_outside_transaction(
    conn: asyncpg.Connection,
    migration: Migration,
    progress: Callable[[Migration], None] | None,
    connect: Callable[[], Awaitable[asyncpg.Connection]] | None,
) -> bool:
    while True:
        if not await _locked(conn, migration):
            return False
        try:
            await conn.execute(_CREATE_CLAIMS_TABLE)
            claimed = await conn.fetchval(
                "INSERT INTO jobq_schema_claims (version) VALUES ($1) ON CONFLICT (version) DO"
                " UPDATE SET renewed_at = now() WHERE jobq_schema_claims.renewed_at"
                " < now() - make_interval(secs => $2) RETURNING true",
                migration.version,
                _CLAIM_STALE_SECONDS,
            )
        except BaseException:
            if not conn.is_closed():
                await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")
        if claimed:
            break
        await asyncio.sleep(0.1)  # another process runs this step: wait for its record
    if progress is not None:
        progress(migration)
    guard = await connect() if connect is not None else None
    renewing = asyncio.ensure_future(_renew(guard, migration)) if guard is not None else None
    try:
        for statement in migration.statements():
            await conn.execute(statement)
    finally:
        if renewing is not None:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
        if guard is not None:
            await guard.close()
    async with conn.transaction():
        await _record(conn, migration)
        await conn.execute("DELETE FROM jobq_schema_claims WHERE version = $1", migration.version)
    return True


async def _renew(guard: asyncpg.Connection, migration: Migration) -> None:
    """Keep the claim of a long step (an index build) fresh, from a second connection."""
    while True:
        await asyncio.sleep(_CLAIM_STALE_SECONDS / 6)
        await guard.execute(
            "UPDATE jobq_schema_claims SET renewed_at = now() WHERE version = $1",
            migration.version,
        )
