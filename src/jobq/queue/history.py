"""History leaves and retention: creating leaves ahead, removing expired ones, pruning rows.

`jobs_history` is partitioned by class (`done`: succeeded and cancelled; `failed`:
failed_permanent) and then by finish time into leaves, each registered in
`jobq_history_partitions` and made only by `jobq_history_ensure_partition` (migration 0004).
Retention removes whole leaves: `DETACH PARTITION ... CONCURRENTLY` (SHARE UPDATE EXCLUSIVE on
the class table only: completions and readers go on), then, in one transaction, the leaf's
rows leave the count rollup, the table is dropped and its registry row deleted. A pass that
died between those steps is finished by the next one. Rows past a horizon that cuts through a
leaf are deleted in batches instead, through `jobs_history`, so that its triggers keep the
counts right.

The functions take a connection of the caller's; `Retention` runs them under the lock that
lets one session at a time remove history.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg

from jobq.queue.base import Connection

log = logging.getLogger("jobq.retention")

# Final statuses by history class, as the class tables' partition bounds say.
CLASS_STATUSES: dict[str, tuple[str, ...]] = {
    "done": ("succeeded", "cancelled"),
    "failed": ("failed_permanent",),
}
CLASS_OF_STATUS = {status: cls for cls, statuses in CLASS_STATUSES.items() for status in statuses}
# Rows (and keys) per transaction when they go one by one.
BATCH_SIZE = 10_000
# How far ahead leaves exist: this many widths past the current one.
LEAVES_AHEAD = 2

# Advisory lock keys (hashtext of the name). The retention lock lets one session at a time
# remove history; the counts lock is the one compaction and jobq_counts_rebuild() hold.
RETENTION_LOCK = "jobq_retention"
PARTITIONER_LOCK = "jobq_partitioner"
COUNTS_LOCK = "jobq_counts"

_TRY_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext($1))"
# Simple protocol (no parameters): see `Retention.locked`.
_COUNTS_LOCK = f"SELECT pg_advisory_xact_lock(hashtext('{COUNTS_LOCK}'))"
_RELEASE_SNAPSHOT = "SELECT"

# Every registered leaf and where it stands: attached, detaching (a DETACH ... CONCURRENTLY
# that did not finish), detached (not dropped yet) or missing (dropped by hand).
_LEAVES = """
SELECT p.name, p.class, p.lower_bound, p.upper_bound,
       CASE WHEN to_regclass(quote_ident(p.name)) IS NULL THEN 'missing'
            WHEN i.inhrelid IS NULL THEN 'detached'
            WHEN i.inhdetachpending THEN 'detaching'
            ELSE 'attached' END AS state,
       c.reltuples::bigint AS estimated_rows,
       coalesce(pg_total_relation_size(c.oid), 0) AS bytes
FROM jobq_history_partitions AS p
LEFT JOIN pg_class AS c ON c.oid = to_regclass(quote_ident(p.name))
LEFT JOIN pg_inherits AS i ON i.inhrelid = c.oid
ORDER BY p.class, p.lower_bound
"""

# The instants (one per width, from now) that have no leaf yet, per class.
_MISSING_AHEAD = """
SELECT c.class, c.width, a.at
FROM unnest($1::text[], $2::interval[]) AS c(class, width),
     LATERAL generate_series(0, $3::int) AS n(i),
     LATERAL (SELECT now() + n.i * c.width AS at) AS a
WHERE NOT EXISTS (
    SELECT 1 FROM jobq_history_partitions AS p
    WHERE p.class = c.class AND p.lower_bound <= a.at AND a.at < p.upper_bound
)
ORDER BY c.class, a.at
"""

_ENSURE = "SELECT jobq_history_ensure_partition($1, $2, $3)"

# Attached leaves not yet past that are wider than their class's width now is: made before the
# width was narrowed (a fresh install's day-wide leaves, then JOBQ_RETENTION=2m).
_TOO_WIDE = """
SELECT p.name, p.class
FROM jobq_history_partitions AS p
JOIN unnest($1::text[], $2::interval[]) AS c(class, width) ON c.class = p.class
WHERE p.upper_bound > now() AND p.upper_bound - p.lower_bound > c.width
  AND to_regclass(quote_ident(p.name)) IS NOT NULL
ORDER BY p.class, p.lower_bound
"""

_NOW = "SELECT now()"

# Counts of a detached leaf leave the rollup as one negative delta per (queue, kind,
# status), the way the delete trigger would have written them.
_SUBTRACT_COUNTS = """
WITH gone AS (
    INSERT INTO jobq_count_deltas (queue, kind, status, n)
    SELECT queue, kind, status, -count(*) FROM {leaf} GROUP BY queue, kind, status
    RETURNING n
)
SELECT coalesce(-sum(n), 0)::bigint FROM gone
"""

_STILL_DETACHED = """
SELECT to_regclass(quote_ident($1)) IS NOT NULL
   AND NOT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(quote_ident($1)))
"""

_FORGET_LEAF = "DELETE FROM jobq_history_partitions WHERE name = $1"

# One batch of a leaf's rows that finished before the horizon, walked by id from where the
# previous batch ended (the id index; finish time has none). The delete goes through
# jobs_history, so that its statement trigger takes the rows out of the counts; the bounds
# prune it to the one leaf.
_DELETE_BATCH = f"""
WITH batch AS (
    SELECT id FROM jobs_history
    WHERE finished_at >= $1 AND finished_at < $2 AND status = ANY($3::text[])
      AND finished_at < $4 AND ($5::uuid IS NULL OR id > $5)
    ORDER BY id
    LIMIT {BATCH_SIZE}
), gone AS (
    DELETE FROM jobs_history AS h
    USING batch
    WHERE h.id = batch.id AND h.finished_at >= $1 AND h.finished_at < $2
      AND h.status = ANY($3::text[]) AND h.finished_at < $4
    RETURNING h.id, h.idempotency_key
), keys AS (
    DELETE FROM jobq_idempotency_keys AS k
    USING gone
    WHERE gone.idempotency_key IS NOT NULL AND k.key = gone.idempotency_key
      AND k.job_id = gone.id AND k.expires_at <= now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone) AS deleted,
       (SELECT count(*) FROM keys) AS keys,
       (SELECT count(*) FROM batch) AS seen,
       (SELECT id FROM batch ORDER BY id DESC LIMIT 1) AS last_id
"""

_COUNT_ROWS = """
SELECT count(*) FROM jobs_history
WHERE finished_at >= $1 AND finished_at < $2 AND status = ANY($3::text[]) AND finished_at < $4
"""

# Keys past their window whose job exists in neither table. A key row is written with its job
# (or copied from it), so the job cannot have finished before the key's created_at: that
# bound prunes the history probe to the leaves it could be in (a subquery with LIMIT, so that
# it runs per key with run-time pruning rather than as a join over all of history).
_EXPIRED_KEY = """
k.expires_at <= now()
AND NOT EXISTS (SELECT 1 FROM jobs AS j WHERE j.id = k.job_id)
AND (SELECT 1 FROM jobs_history AS h
     WHERE h.id = k.job_id AND h.finished_at >= k.created_at LIMIT 1) IS NULL
"""

# Candidates in (expires_at, key) order from a cursor, so that keys kept for a job that still
# exists do not hide later ones, and a pass can stop and the next go on.
_KEY_CANDIDATES = f"""
SELECT expires_at, key FROM jobq_idempotency_keys
WHERE expires_at <= now() AND ($1::timestamptz IS NULL OR (expires_at, key) > ($1, $2::text))
ORDER BY expires_at, key
LIMIT {BATCH_SIZE}
"""

_DELETE_KEYS = f"""
WITH gone AS (
    DELETE FROM jobq_idempotency_keys AS k
    WHERE k.key IN (
        SELECT k.key FROM jobq_idempotency_keys AS k
        WHERE k.key = ANY($1::text[]) AND {_EXPIRED_KEY}
        FOR UPDATE SKIP LOCKED
    ) AND {_EXPIRED_KEY}
    RETURNING 1
)
SELECT count(*) FROM gone
"""

_COUNT_KEYS = f"""
SELECT count(*) FROM jobq_idempotency_keys AS k
WHERE k.key = ANY($1::text[]) AND {_EXPIRED_KEY}
"""

# Keys of the jobs in a leaf being dropped that are past their window: they go with the leaf,
# found by their primary key from the key each history row keeps.
_FORGET_KEYS_OF_LEAF = """
WITH gone AS (
    DELETE FROM jobq_idempotency_keys AS k
    USING {leaf} AS h
    WHERE h.idempotency_key IS NOT NULL AND k.key = h.idempotency_key AND k.job_id = h.id
      AND k.expires_at <= now()
    RETURNING 1
)
SELECT count(*) FROM gone
"""

# Keys that expired while their job still existed and are not freed with it (a job deleted by
# hand) wait for a full scan; a scan that caught up re-reads this much before its cursor, for
# keys written by transactions that committed late.
KEY_SCAN_OVERLAP = timedelta(minutes=2)
# Batches of candidate keys one cleaner pass reads at most; the next pass goes on from there.
KEY_BATCHES_PER_PASS = 10


@dataclass
class KeyCursor:
    """How far a cleaner's scan for expired keys got: keys up to (`expires_at`, `key`) were
    checked; `caught_up` once it reached the keys expiring now."""

    expires_at: datetime | None = None
    key: str = ""
    caught_up: bool = False


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def class_table(cls: str) -> str:
    return f"jobs_history_{cls}"


@dataclass(frozen=True)
class Leaf:
    name: str
    cls: str
    lower: datetime
    upper: datetime
    state: str  # attached, detaching, detached, missing
    estimated_rows: int  # pg_class.reltuples; -1 before the leaf was first analyzed
    bytes: int

    @property
    def statuses(self) -> tuple[str, ...]:
        return CLASS_STATUSES[self.cls]


@dataclass(frozen=True)
class Target:
    """What to remove of one class: rows of `statuses` that finished before `horizon`."""

    cls: str
    statuses: tuple[str, ...]
    horizon: datetime

    @property
    def whole_class(self) -> bool:
        return set(self.statuses) == set(CLASS_STATUSES[self.cls])


@dataclass(frozen=True)
class RemovedLeaf:
    leaf: Leaf
    rows: int  # exact when removed; the estimate (reltuples, or a count) on a dry run
    bytes: int


@dataclass(frozen=True)
class DeletedRows:
    """Rows deleted one batch at a time from a leaf the horizon cuts through (or whose other
    statuses stay)."""

    leaf: Leaf
    statuses: tuple[str, ...]
    horizon: datetime
    rows: int
    batches: int
    keys: int = 0  # their expired idempotency keys, deleted with them


@dataclass
class Report:
    """What a pass removed, or on a dry run would remove."""

    dry_run: bool = False
    leaves: list[RemovedLeaf] = field(default_factory=list)
    deleted: list[DeletedRows] = field(default_factory=list)
    keys: int = 0

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.leaves) + sum(d.rows for d in self.deleted)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.leaves)

    @property
    def removed_anything(self) -> bool:
        return bool(self.leaves or self.rows or self.keys)


def plan(leaves: Iterable[Leaf], targets: Iterable[Target]) -> tuple[list[Leaf], list[Leaf]]:
    """The leaves to remove whole, and the attached leaves to delete rows from, for `targets`.

    A leaf goes whole when its class is targeted whole and it ends at or before the horizon;
    a leaf left detached or half-detached by an earlier pass goes whatever the targets. Rows
    are deleted from the other attached leaves that start before the horizon.
    """
    by_class = {t.cls: t for t in targets}
    whole: list[Leaf] = []
    partial: list[Leaf] = []
    for leaf in leaves:
        if leaf.state in {"detaching", "detached"}:
            whole.append(leaf)
            continue
        target = by_class.get(leaf.cls)
        if leaf.state != "attached" or target is None or leaf.lower >= target.horizon:
            continue
        if target.whole_class and leaf.upper <= target.horizon:
            whole.append(leaf)
        else:
            partial.append(leaf)
    # At most one leaf per class table can be half-detached: finish those before detaching.
    whole.sort(key=lambda leaf: _REMOVAL_ORDER[leaf.state])
    return whole, partial


_REMOVAL_ORDER = {"detaching": 0, "detached": 1, "missing": 2, "attached": 3}


async def leaves(conn: Connection) -> list[Leaf]:
    return [
        Leaf(
            name=r["name"],
            cls=r["class"],
            lower=r["lower_bound"],
            upper=r["upper_bound"],
            state=r["state"],
            estimated_rows=r["estimated_rows"] if r["estimated_rows"] is not None else -1,
            bytes=r["bytes"],
        )
        for r in await conn.fetch(_LEAVES)
    ]


async def replace_wide_empty(conn: Connection, widths: Mapping[str, timedelta]) -> list[str]:
    """Drop the leaves that are wider than their class's width and hold no row, so that
    `ensure_ahead` makes narrow ones in their place; the names dropped. Within the caller's
    transaction: the class table is locked (ACCESS EXCLUSIVE, at most the lock_timeout of 2 s
    spent waiting) until it commits, so no completion can land in a leaf between the check
    that it is empty and its drop. Only the first time after a width is narrowed has any
    work; a leaf that holds rows stays and expires whole as before."""
    classes = sorted(widths)
    wide = await conn.fetch(_TOO_WIDE, classes, [widths[c] for c in classes])
    dropped: list[str] = []
    locked: set[str] = set()
    for row in wide:
        cls, table = row["class"], _ident(row["name"])
        try:
            async with conn.transaction():
                if cls not in locked:
                    # The order jobq_history_ensure_partition takes its locks in: no deadlock
                    # with a completion creating a leaf meanwhile.
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext('jobq_history_partitions'))"
                    )
                    await conn.execute("SELECT set_config('lock_timeout', '2s', true)")
                    await conn.execute(
                        f"LOCK TABLE ONLY {class_table(cls)} IN ACCESS EXCLUSIVE MODE"
                    )
                    locked.add(cls)
                if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                    continue
                await conn.execute(f"DROP TABLE {table}")
                await conn.execute(_FORGET_LEAF, row["name"])
                dropped.append(row["name"])
        except asyncpg.exceptions.LockNotAvailableError:
            log.warning("wide history leaf not replaced: its class table is busy; next pass"
                        " retries", extra={"class": cls})  # fmt: skip
            return dropped
    return dropped


async def ensure_ahead(conn: Connection, widths: Mapping[str, timedelta]) -> list[str]:
    """Create the leaves missing from now to `LEAVES_AHEAD` widths ahead, per class (`widths`:
    each class's leaf width). Each in a savepoint, so that one that cannot get its lock in
    time (the function's lock_timeout) does not undo the others; the next pass retries it.
    Returns the names of the leaves created."""
    classes = sorted(widths)
    missing = await conn.fetch(_MISSING_AHEAD, classes, [widths[c] for c in classes], LEAVES_AHEAD)
    made: list[str] = []
    for row in missing:
        try:
            async with conn.transaction():
                made.append(await conn.fetchval(_ENSURE, row["class"], row["at"], row["width"]))
        except asyncpg.exceptions.LockNotAvailableError:
            log.warning("history leaf not created: its class table is locked; next pass retries",
                        extra={"class": row["class"]})  # fmt: skip
    return made


async def detach(conn: Connection, leaf: Leaf) -> None:
    """Detach `leaf` from its class table without blocking its writers and readers. Not in a
    transaction block. Cancelled midway (a timeout, a crash), the leaf stays half-detached:
    `finalize` completes it."""
    await conn.execute(
        f"ALTER TABLE {class_table(leaf.cls)} DETACH PARTITION {_ident(leaf.name)} CONCURRENTLY"
    )


async def finalize(conn: Connection, leaf: Leaf) -> None:
    await conn.execute(
        f"ALTER TABLE {class_table(leaf.cls)} DETACH PARTITION {_ident(leaf.name)} FINALIZE"
    )


async def drop_detached(conn: Connection, leaf: Leaf) -> tuple[int, int, int]:
    """Drop a detached leaf, its rows out of the counts, its expired keys and its registry row
    gone: one transaction. Returns (rows, bytes, keys)."""
    async with conn.transaction():
        if not await conn.fetchval(_STILL_DETACHED, leaf.name):
            raise RuntimeError(f"history leaf {leaf.name} is attached again; not dropped")
        table = _ident(leaf.name)
        await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        size = await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
        rows = await conn.fetchval(_SUBTRACT_COUNTS.format(leaf=table))
        keys = await conn.fetchval(_FORGET_KEYS_OF_LEAF.format(leaf=table))
        await conn.execute(f"DROP TABLE {table}")
        await conn.execute(_FORGET_LEAF, leaf.name)
    return int(rows), int(size), int(keys)


async def remove_leaf(conn: Connection, leaf: Leaf) -> tuple[int, int, int]:
    """Detach (or finish detaching) and drop `leaf`; (rows, bytes, keys). A leaf dropped by
    hand only loses its registry row."""
    if leaf.state == "missing":
        await conn.execute(_FORGET_LEAF, leaf.name)
        log.warning("history leaf %s was dropped outside jobq; its rows may still be counted",
                    leaf.name)  # fmt: skip
        return 0, 0, 0
    if leaf.state == "attached":
        await detach(conn, leaf)
    elif leaf.state == "detaching":
        await finalize(conn, leaf)
    return await drop_detached(conn, leaf)


async def delete_rows(
    conn: Connection, leaf: Leaf, statuses: tuple[str, ...], horizon: datetime
) -> DeletedRows:
    """Delete the rows of `leaf` with one of `statuses` that finished before `horizon`,
    `BATCH_SIZE` rows per transaction."""
    statuses = tuple(s for s in statuses if s in leaf.statuses)
    deleted = batches = keys = 0
    last: object = None
    while True:
        row = await conn.fetchrow(
            _DELETE_BATCH, leaf.lower, leaf.upper, list(statuses), horizon, last
        )
        assert row is not None
        if row["seen"] == 0:
            break
        deleted += row["deleted"]
        keys += row["keys"]
        batches += 1
        last = row["last_id"]
        if row["seen"] < BATCH_SIZE:
            break
    return DeletedRows(leaf, statuses, horizon, deleted, batches, keys)


async def count_rows(
    conn: Connection, leaf: Leaf, statuses: tuple[str, ...], horizon: datetime
) -> int:
    statuses = tuple(s for s in statuses if s in leaf.statuses)
    return int(await conn.fetchval(_COUNT_ROWS, leaf.lower, leaf.upper, list(statuses), horizon))


async def expire_keys(
    conn: Connection,
    cursor: KeyCursor | None = None,
    *,
    max_batches: int | None = None,
    dry_run: bool = False,
) -> int:
    """Delete (or count) idempotency keys past their window whose job exists in neither
    table, `BATCH_SIZE` candidates per transaction: all of them, or with `cursor`, from where
    it stands, at most `max_batches` batches, moving it on."""
    cursor = cursor or KeyCursor()
    after, after_key = cursor.expires_at, cursor.key
    if cursor.caught_up and after is not None:
        # Keys whose job exists at expiry go with their leaf (`drop_detached`).
        after, after_key = after - KEY_SCAN_OVERLAP, ""
    removed = batches = 0
    while True:
        if max_batches is not None and batches >= max_batches:
            cursor.caught_up = False
            break
        candidates = await conn.fetch(_KEY_CANDIDATES, after, after_key)
        batches += 1
        if candidates:
            keys = [c["key"] for c in candidates]
            removed += int(await conn.fetchval(_COUNT_KEYS if dry_run else _DELETE_KEYS, keys))
            after, after_key = candidates[-1]["expires_at"], candidates[-1]["key"]
            if cursor.expires_at is None or (after, after_key) > (cursor.expires_at, cursor.key):
                cursor.expires_at, cursor.key = after, after_key
        if len(candidates) < BATCH_SIZE:
            cursor.caught_up = True
            break
    return removed


def retention_targets(
    now: datetime,
    retention: Mapping[str, timedelta | None],
    *,
    statuses: Iterable[str] | None = None,
) -> list[Target]:
    """Targets for each class with a retention (`retention`: by class, None keeps forever),
    optionally only for some statuses."""
    wanted = set(statuses) if statuses is not None else set(CLASS_OF_STATUS)
    targets = []
    for cls, keep in retention.items():
        chosen = tuple(s for s in CLASS_STATUSES[cls] if s in wanted)
        if keep is not None and chosen:
            targets.append(Target(cls, chosen, now - keep))
    return targets


class Retention:
    """Removing history under the retention lock: one session at a time, whichever worker
    or `jobq prune` it is.

    The lock is transaction-scoped, taken on a connection of its own that stays in its
    transaction for the pass (the detach cannot run in one, so it runs on a second
    connection): a process that dies releases it with its connection, and it holds through a
    transaction pooler. While leaves are detached and dropped that connection also holds the
    counts lock, so that a recount (jobq_counts_rebuild) cannot fall between a detach and the
    subtraction of the leaf's counts, which would take them out twice.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def locked(self, key: str = RETENTION_LOCK) -> AsyncIterator[Connection | None]:
        """The lock's connection, or None when another session holds the lock."""
        async with self.pool.acquire() as lock_conn, lock_conn.transaction():
            if not await lock_conn.fetchval(_TRY_LOCK, key):
                yield None
                return
            # A statement of the extended protocol leaves its portal, and the portal's
            # snapshot, until the next statement; one of the simple protocol drops it, so that
            # this idle transaction holds back no snapshot (DETACH ... FINALIZE waits for
            # every older one).
            await lock_conn.execute(_RELEASE_SNAPSHOT)
            yield lock_conn

    async def now(self) -> datetime:
        value: datetime = await self.pool.fetchval(_NOW)
        return value

    async def run(
        self,
        targets: list[Target],
        *,
        cut: bool = False,
        dry_run: bool = False,
        keys: KeyCursor | None = None,
    ) -> Report | None:
        """Remove the leaves `targets` name, expired keys, and whatever an earlier pass left
        half done; with `cut`, also the rows past a horizon in leaves that stay. Keys are all
        scanned, or with `keys` (a cleaner's cursor) `KEY_BATCHES_PER_PASS` batches on from
        it. None when another session holds the retention lock (nothing was done)."""
        if dry_run:
            async with self.pool.acquire() as conn:
                return await self._dry_run(conn, targets, cut=cut)
        if self.pool.get_max_size() < 2:
            raise RuntimeError("removing history needs a pool of at least 2 connections")
        async with self.locked() as lock_conn:
            if lock_conn is None:
                return None
            async with self.pool.acquire() as conn:
                return await self._run(lock_conn, conn, targets, cut=cut, keys=keys)

    async def _run(
        self,
        lock_conn: Connection,
        conn: Connection,
        targets: list[Target],
        *,
        cut: bool,
        keys: KeyCursor | None,
    ) -> Report:
        report = Report()
        # Keys and rows first: they need no lock but this pass's, and leaves hold the counts
        # lock until the pass ends.
        report.keys = await expire_keys(
            conn, keys, max_batches=None if keys is None else KEY_BATCHES_PER_PASS
        )
        by_class = {t.cls: t for t in targets}
        whole, partial = plan(await leaves(conn), targets)
        for leaf in partial if cut else []:
            target = by_class[leaf.cls]
            deleted = await delete_rows(conn, leaf, target.statuses, target.horizon)
            if deleted.rows:
                report.deleted.append(deleted)
                report.keys += deleted.keys
        if whole:
            await lock_conn.execute(_COUNTS_LOCK)
        for leaf in whole:
            rows, size, leaf_keys = await remove_leaf(conn, leaf)
            report.leaves.append(RemovedLeaf(leaf, rows, size))
            report.keys += leaf_keys
        return report

    async def _dry_run(self, conn: Connection, targets: list[Target], *, cut: bool) -> Report:
        report = Report(dry_run=True)
        report.keys = await expire_keys(conn, dry_run=True)
        by_class = {t.cls: t for t in targets}
        whole, partial = plan(await leaves(conn), targets)
        for leaf in whole:
            rows = leaf.estimated_rows
            if rows < 0 and leaf.state != "missing":  # never analyzed: small, count it
                rows = int(await conn.fetchval(f"SELECT count(*) FROM {_ident(leaf.name)}"))
            report.leaves.append(RemovedLeaf(leaf, max(rows, 0), leaf.bytes))
        for leaf in partial if cut else []:
            target = by_class[leaf.cls]
            rows = await count_rows(conn, leaf, target.statuses, target.horizon)
            if rows:
                statuses = tuple(s for s in target.statuses if s in leaf.statuses)
                report.deleted.append(
                    DeletedRows(leaf, statuses, target.horizon, rows, -(-rows // BATCH_SIZE))
                )
        return report
