"""Applies the versioned SQL migrations shipped in `jobq/migrations/`, once each, in order."""

from __future__ import annotations

import asyncio
import contextlib
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

# A migration declares how it runs in `-- jobq:...` lines at the top of its file:
# - `outside-transaction`: its statements run one at a time, outside a transaction
#   (`CREATE INDEX CONCURRENTLY` cannot run in one). They must be safe to run again: a crash
#   can leave the step half applied.
# - `post-deploy`: it removes or moves what only the previous version of jobq needs, so it
#   runs once every process runs this version (`jobq migrate`, not `jobq migrate
#   --pre-deploy`). Every other step is pre-deploy: additive, safe while the previous
#   version runs, and required by this version before it starts. `--pre-deploy` applies
#   pre-deploy steps numbered after a pending post-deploy one too, so a pre-deploy step must
#   not touch what a post-deploy step creates, removes or redefines.
# - `lock-timeout <duration>` (with outside-transaction): every statement waits at most that
#   long for a lock (see `_run_statement`).
_DIRECTIVE = re.compile(r"^--\s*jobq:(\S+)(?:\s+(\S+))?\s*$")
_OUTSIDE_TRANSACTION = "outside-transaction"
_POST_DEPLOY = "post-deploy"
_LOCK_TIMEOUT = "lock-timeout"

# Statements PostgreSQL refuses in a transaction block (or, for CALL of a procedure that
# commits, whose transaction control needs the top level).
_TOP_LEVEL_ONLY = re.compile(r"\bCONCURRENTLY\b|^\s*(CALL|VACUUM)\b", re.I)
_DOLLAR_QUOTE = re.compile(r"\$[A-Za-z_][A-Za-z_0-9]*\$|\$\$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    def _directives(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for line in self.sql.splitlines():
            if not line.startswith("--"):
                break
            match = _DIRECTIVE.match(line)
            if match:
                found[match[1]] = match[2] or ""
        return found

    @property
    def outside_transaction(self) -> bool:
        return _OUTSIDE_TRANSACTION in self._directives()

    @property
    def post_deploy(self) -> bool:
        return _POST_DEPLOY in self._directives()

    @property
    def lock_timeout(self) -> str | None:
        """The lock timeout every statement runs with, as PostgreSQL reads it (`2s`)."""
        return self._directives().get(_LOCK_TIMEOUT) or None

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    def statements(self) -> list[str]:
        """The statements of the migration, without comment-only lines.

        A statement ends with `;` at the end of a line, outside dollar quotes (a function
        body's statements end with `;` too).
        """
        statements: list[str] = []
        current: list[str] = []
        quote: str | None = None
        for line in self.sql.splitlines():
            if quote is None and line.lstrip().startswith("--"):
                continue
            current.append(line)
            for match in _DOLLAR_QUOTE.finditer(line):
                if quote is None:
                    quote = match[0]
                elif match[0] == quote:
                    quote = None
            if quote is None and line.rstrip().endswith(";"):
                statement = "\n".join(current).strip().removesuffix(";").strip()
                if statement:
                    statements.append(statement)
                current = []
        rest = "\n".join(current).strip()
        if rest:
            statements.append(rest)
        return statements


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


class MigrationError(Exception):
    """A step could not be applied for a reason the operator can act on (its message says)."""


def pending_required(applied_versions: set[int]) -> list[Migration]:
    """The steps this version of jobq needs before it starts: every pending pre-deploy step.

    Pending post-deploy steps are fine: the code works before and after them.
    """
    return [m for m in available() if m.version not in applied_versions and not m.post_deploy]


async def status(conn: asyncpg.Connection) -> list[tuple[Migration, bool]]:
    """Every migration this version ships, with whether it is applied."""
    done = await applied(conn)
    return [(m, m.version in done) for m in available()]


async def migrate(
    conn: asyncpg.Connection,
    *,
    progress: Callable[[Migration], None] | None = None,
    connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
    pre_deploy: bool = False,
    target: int | None = None,
    notice: Callable[[Migration, str], None] | None = None,
) -> list[int]:
    """Apply pending migrations; return the versions applied by this call.

    With `pre_deploy`, apply only the pre-deploy steps, skipping pending post-deploy ones (run
    those once every process runs this version): so an upgrade across several releases needs
    one deploy, which is sound because a pre-deploy step gives the same schema whether or not
    the post-deploy steps numbered before it ran (tests/test_migrations.py checks it).
    With `target`, apply no version above it (tests build older schemas so). `notice`
    receives what a step reports as it runs (the NOTICEs of its statements: a long data move
    prints its progress); without it they are logged.

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
        if target is not None and migration.version > target:
            break
        if pre_deploy and migration.post_deploy:
            continue
        if migration.outside_transaction:
            applied_now = await _apply_outside_transaction(
                conn, migration, progress, connect, notice
            )
        else:
            applied_now = await _apply_in_transaction(conn, migration, progress)
        if applied_now:
            if progress is None:  # a caller with a progress callback reports each step itself
                log.info("applied migration %s", migration.label)
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
    notice: Callable[[Migration, str], None] | None,
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
            # The insert may have waited for the claimant's own transaction, which recorded
            # the step and removed its claim: this statement's snapshot sees that record.
            if claimed and await conn.fetchval(
                "SELECT true FROM jobq_schema_migrations WHERE version = $1", migration.version
            ):
                await conn.execute("ROLLBACK")
                return False
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

    def forward(_conn: object, message: asyncpg.PostgresLogMessage) -> None:
        text = str(message.message)
        if notice is not None:
            notice(migration, text)
        else:
            log.info("%s: %s", migration.label, text)

    conn.add_log_listener(forward)
    try:
        for statement in migration.statements():
            await _run_statement(conn, migration, statement)
    except MigrationError:
        # Gave up waiting, with nothing half done that another run could not redo: the
        # next `jobq migrate` may claim the step at once, not after the claim went stale.
        with contextlib.suppress(Exception):
            await conn.execute(
                "DELETE FROM jobq_schema_claims WHERE version = $1", migration.version
            )
        raise
    finally:
        if not conn.is_closed():
            conn.remove_log_listener(forward)
        if renewing is not None:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
        if guard is not None:
            await guard.close()
    async with conn.transaction():
        await _record(conn, migration)
        await conn.execute("DELETE FROM jobq_schema_claims WHERE version = $1", migration.version)
    return True


_DURATION = re.compile(r"^\d+(ms|s|min)$")


async def _run_statement(conn: asyncpg.Connection, migration: Migration, statement: str) -> None:
    """Run one statement of a step outside a transaction, within its lock timeout if any.

    A statement that may run in a transaction gets its own, with `SET LOCAL lock_timeout`
    (sound through any pooler). One that may not (`... CONCURRENTLY`, `CALL`) gets a session
    `SET lock_timeout` for its duration, unless the connection goes through a transaction
    pooler, where a session setting would stay behind on a server connection another client
    gets next: there it runs without one (such statements take at most SHARE UPDATE
    EXCLUSIVE, which no reader or writer of jobs waits for; a procedure sets its own).
    """
    timeout = migration.lock_timeout
    if timeout is None:
        await conn.execute(statement)
        return
    if not _DURATION.match(timeout):
        raise MigrationError(f"{migration.label}: lock-timeout {timeout!r} is not like 2s")
    try:
        if not _TOP_LEVEL_ONLY.search(statement):
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{timeout}'")
                await conn.execute(statement)
        elif getattr(conn, "_jobq_pooler", "none") == "transaction":
            await conn.execute(statement)
        else:
            await conn.execute(f"SET lock_timeout = '{timeout}'")
            try:
                await conn.execute(statement)
            finally:
                if not conn.is_closed():
                    await conn.execute("RESET lock_timeout")
    except asyncpg.LockNotAvailableError as exc:
        raise MigrationError(
            f"{migration.label} waited {timeout} for a lock another transaction holds, and"
            f" gave up so as not to hold others up ({exc}); nothing is lost: run `jobq"
            " migrate` again once that transaction has ended"
        ) from exc


async def _renew(guard: asyncpg.Connection, migration: Migration) -> None:
    """Keep the claim of a long step (an index build) fresh, from a second connection."""
    while True:
        await asyncio.sleep(_CLAIM_STALE_SECONDS / 6)
        await guard.execute(
            "UPDATE jobq_schema_claims SET renewed_at = now() WHERE version = $1",
            migration.version,
        )
