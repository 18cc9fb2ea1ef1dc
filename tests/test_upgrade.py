"""Upgrading a populated schema-v3 database to the storage of #10 while version-3 processes run:
pre-deploy steps, a rolling deploy, post-deploy steps (docs/upgrade.md)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from jobq import db, schema
from jobq.queue import Lease, NewJob, Queue
from tests import v3_queue as v3
from tests.conftest import create_database, drop_database, with_database
from tests.helpers import wait_for
from tests.test_cli import jobq

PRE_DEPLOY = [m.version for m in schema.available() if not m.post_deploy]
POST_DEPLOY = [m.version for m in schema.available() if m.post_deploy]
V3_INDEXES = (
    "jobs_created_idx",
    "jobs_status_created_idx",
    "jobs_kind_created_idx",
    "jobs_queue_created_idx",
    "jobs_finished_idx",
    "jobs_idempotency_key_idx",
)
FINISHED = ("succeeded", "failed_permanent", "cancelled")

# Finished history as a v3 database has it: every final status, finish times over 90 days
# (older than 30 days goes to one leaf per class), every seventh job keyed.
_SEED_HISTORY = """
INSERT INTO jobs (kind, status, attempts, max_attempts, started_at, finished_at,
                  idempotency_key, request_fingerprint, result, last_error, created_at)
SELECT 'v3.history', s.status, 1, 3, f.at, f.at,
       CASE WHEN i % 7 = 0 THEN 'v3-history-' || i END,
       CASE WHEN i % 7 = 0 THEN 'fp' END,
       CASE WHEN s.status = 'succeeded' THEN '{"ok": true}'::jsonb END,
       CASE WHEN s.status <> 'succeeded' THEN 'Error: boom' END,
       f.at - interval '1 second'
FROM generate_series(1, $1) AS i
CROSS JOIN LATERAL (SELECT (ARRAY['succeeded', 'failed_permanent', 'cancelled'])[1 + i % 3]
                    AS status) AS s
CROSS JOIN LATERAL (SELECT now() - (i % 90) * interval '1 day' - interval '1 hour' AS at) AS f
RETURNING id
"""

_ROLLUP_DRIFT = """
SELECT queue, kind, status, r.n AS rollup, t.n AS counted
FROM (SELECT queue, kind, status, sum(n) AS n
      FROM (SELECT queue, kind, status, n FROM jobq_counts
            UNION ALL
            SELECT queue, kind, status, n FROM jobq_count_deltas) AS d
      GROUP BY queue, kind, status HAVING sum(n) <> 0) AS r
FULL JOIN (SELECT queue, kind, status, count(*) AS n
           FROM (SELECT queue, kind, status FROM jobs
                 UNION ALL
                 SELECT queue, kind, status FROM jobs_history) AS j
           GROUP BY queue, kind, status) AS t USING (queue, kind, status)
WHERE r.n IS DISTINCT FROM t.n
"""

_ALL_IDS = "SELECT id FROM jobs UNION ALL SELECT id FROM jobs_history"


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


class _NewWorker:
    """This version's claim and fenced completion, run in a loop next to version 3's."""

    def __init__(self, queue: Queue, kinds: list[str]) -> None:
        self.queue = queue
        self.kinds = kinds
        self.completed: list[uuid.UUID] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            jobs = await self.queue.claim("new-worker", self.kinds, ["default"], 50,
                                          lease_seconds=30)  # fmt: skip
            for job in jobs:
                assert job.lease_token is not None
                if await self.queue.complete(Lease(job.id, job.lease_token), {"by": "new"}):
                    self.completed.append(job.id)
            if not jobs:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.02)


@dataclass
class Upgrade:
    """What the upgrade under load did, for the tests below to check one property each."""

    enqueued: list[uuid.UUID] = field(default_factory=list)
    stored: list[uuid.UUID] = field(default_factory=list)
    held: set[uuid.UUID] = field(default_factory=set)
    v3_worker: v3.V3Worker | None = None
    keys: dict[str, uuid.UUID] = field(default_factory=dict)
    replays: dict[str, tuple[bool, uuid.UUID]] = field(default_factory=dict)
    pre_deploy_applied: list[int] = field(default_factory=list)
    post_deploy_applied: list[int] = field(default_factory=list)
    finished_in_jobs: int = -1
    indexes: set[str] = field(default_factory=set)
    rollup_drift: list[asyncpg.Record] = field(default_factory=list)


async def _replay(queue: Queue, key: str, n: int) -> tuple[bool, uuid.UUID]:
    result = await queue.enqueue(NewJob(kind="v3.echo", payload={"n": n}, idempotency_key=key))
    return result.created, result.job.id


@pytest.fixture(scope="module")
async def upgrade(admin_dsn: str) -> AsyncIterator[Upgrade]:
    """Schema v3 with jobs in every state, upgraded step by step: version 3's worker and
    enqueuer run through the pre-deploy steps and the deploy (this version's code running
    beside them), stop, and this version's worker runs through the post-deploy steps."""
    done = Upgrade()
    async with _database(admin_dsn, "upgrade_under_load") as dsn:
        conn = await db.connect(dsn)
        pool = await db.create_pool(dsn, min_size=2, max_size=10)
        worker = v3.V3Worker(pool, ["v3.echo", "v3.hold"], held=["v3.hold"])
        enqueuer = v3.V3Enqueuer(pool, "v3.echo")
        new_worker = _NewWorker(Queue(pool), ["v3.echo", "new.echo"])
        try:
            assert await schema.migrate(conn, target=3) == [1, 2, 3]
            done.enqueued += [r["id"] for r in await conn.fetch(_SEED_HISTORY, 600)]
            done.enqueued += [await v3.enqueue(conn, "v3.later", {}) for _ in range(20)]
            await conn.execute("UPDATE jobs SET run_at = now() + interval '1 day'"
                               " WHERE kind = 'v3.later'")  # fmt: skip
            for n in range(10):
                done.enqueued.append(await v3.enqueue(conn, "v3.hold", {"n": n}))
            for n in range(5):
                key = f"v3-seed-{n}"
                done.keys[key] = await v3.enqueue(conn, "v3.echo", {"n": n}, key=key)
                done.enqueued.append(done.keys[key])
            # A retrying job, failed once by version 3 (claimed by a kind nobody works).
            done.enqueued.append(await v3.enqueue(conn, "v3.flaky", {}))
            (flaky,) = await conn.fetch(v3.CLAIM, "v3-flaky", ["v3.flaky"], ["default"], 1,
                                        30.0, [], [], 3)  # fmt: skip
            assert await conn.fetchval(v3.FAIL, flaky["id"], flaky["lease_token"],
                                       "Error: once", 3600.0, False) == "retrying"  # fmt: skip

            done.v3_worker = worker
            worker.start()
            enqueuer.start()

            async def holding() -> bool:
                return len(worker.holding) == 10

            await wait_for(holding, timeout=30)
            done.held = set(worker.holding)

            # Pre-deploy, with version 3 writing all along.
            done.pre_deploy_applied = await schema.migrate(conn, pre_deploy=True)

            # Deploy: this version's code beside version 3's.
            queue = new_worker.queue
            new_worker.start()
            for _ in range(50):
                done.enqueued.append((await queue.enqueue(NewJob(kind="new.echo"))).job.id)
            done.replays["v3-seed-0 during deploy"] = await _replay(queue, "v3-seed-0", 0)
            await wait_for(lambda: _async(len(enqueuer.keys) >= 3), timeout=30)
            live_key, live_id = next(iter(enqueuer.keys.items()))
            done.keys[live_key] = live_id
            done.replays[f"{live_key} during deploy"] = await _replay(queue, live_key, 0)

            # Version 3 stops: its held jobs complete under their leases.
            await enqueuer.stop()
            await worker.stop()
            done.enqueued += enqueuer.ids

            # Post-deploy, with this version's worker running.
            for _ in range(50):
                done.enqueued.append((await queue.enqueue(NewJob(kind="new.echo"))).job.id)
            done.post_deploy_applied = await schema.migrate(conn, connect=lambda: db.connect(dsn))
            for _ in range(50):
                done.enqueued.append((await queue.enqueue(NewJob(kind="new.echo"))).job.id)

            async def drained() -> bool:
                return not await conn.fetchval(
                    "SELECT count(*) FROM jobs WHERE kind IN ('v3.echo', 'new.echo')"
                    " AND status <> 'succeeded'"
                )

            await wait_for(drained, timeout=60)
            await new_worker.stop()

            for key in ("v3-seed-0", live_key):
                done.replays[f"{key} after post-deploy"] = await _replay(queue, key, 0)
            done.stored = [r["id"] for r in await conn.fetch(_ALL_IDS)]
            done.finished_in_jobs = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE status = ANY($1::text[])", list(FINISHED)
            )
            done.indexes = {
                r["name"]
                for r in await conn.fetch(
                    "SELECT indexrelid::regclass::text AS name FROM pg_index"
                    " WHERE indrelid = 'jobs'::regclass"
                )
            }
            done.rollup_drift = await conn.fetch(_ROLLUP_DRIFT)
        finally:
            for task in (enqueuer, worker, new_worker):
                with contextlib.suppress(Exception):
                    await task.stop()
            await pool.close()
            await conn.close()
        yield done


async def _async(value: bool) -> bool:
    return value


async def test_pre_deploy_applies_the_additive_steps_while_version_3_runs(
    upgrade: Upgrade,
) -> None:
    assert upgrade.pre_deploy_applied == PRE_DEPLOY[3:]


async def test_post_deploy_applies_the_remaining_steps(upgrade: Upgrade) -> None:
    assert upgrade.post_deploy_applied == POST_DEPLOY


async def test_no_job_is_lost_or_duplicated_across_the_upgrade(upgrade: Upgrade) -> None:
    stored = Counter(upgrade.stored)
    assert [i for i, n in stored.items() if n > 1] == []
    assert set(stored) == set(upgrade.enqueued)
    assert len(upgrade.enqueued) == len(set(upgrade.enqueued))


async def test_jobs_held_by_a_version_3_worker_complete_under_their_lease(
    upgrade: Upgrade,
) -> None:
    worker = upgrade.v3_worker
    assert worker is not None
    assert upgrade.held <= worker.completed
    assert worker.refused == set() and worker.lost_heartbeats == set()


async def test_keys_stored_by_version_3_still_deduplicate(upgrade: Upgrade) -> None:
    expected = {label: (False, upgrade.keys[label.split(" ")[0]]) for label in upgrade.replays}
    assert upgrade.replays == expected


async def test_no_finished_job_is_left_in_the_live_table(upgrade: Upgrade) -> None:
    assert upgrade.finished_in_jobs == 0


async def test_the_version_3_indexes_are_gone(upgrade: Upgrade) -> None:
    assert upgrade.indexes & set(V3_INDEXES) == set()
    assert upgrade.indexes >= {"jobs_pkey", "jobs_queue_claim_idx", "jobs_lease_idx"}


async def test_rollup_counts_equal_a_count_of_the_jobs(upgrade: Upgrade) -> None:
    assert upgrade.rollup_drift == []


# -- the steps one at a time -------------------------------------------------------------


async def test_a_fresh_install_applies_every_step(admin_dsn: str) -> None:
    async with _database(admin_dsn, "fresh_install") as dsn:
        conn = await db.connect(dsn)
        try:
            assert await schema.migrate(conn) == [m.version for m in schema.available()]
            assert all(done for _, done in await schema.status(conn))
        finally:
            await conn.close()


async def test_pre_deploy_applies_every_pre_deploy_step_and_no_post_deploy_one(
    admin_dsn: str,
) -> None:
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


async def test_the_command_line_runs_before_the_post_deploy_steps(v3_dsn: str) -> None:
    migrated = jobq("migrate", "--pre-deploy", env={"DATABASE_URL": v3_dsn})
    assert migrated.returncode == 0, migrated.stderr
    assert "left for once every process runs this version" in migrated.stdout
    result = jobq("enqueue", "echo", env={"DATABASE_URL": v3_dsn})
    assert result.returncode == 0, result.stderr


async def test_migrate_status_shows_each_step_its_kind_and_whether_applied(
    v3_dsn: str,
) -> None:
    result = jobq("migrate", "--status", env={"DATABASE_URL": v3_dsn})
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    for m in schema.available():
        kind = "post-deploy" if m.post_deploy else "pre-deploy"
        assert lines[m.label] == [kind, "applied" if m.version <= 3 else "pending"]


async def test_the_move_puts_old_history_in_one_leaf_per_class_and_recent_in_days(
    v3_dsn: str,
) -> None:
    conn = await db.connect(v3_dsn)
    try:
        await conn.fetch(_SEED_HISTORY, 300)
        await schema.migrate(conn)
        leaves = await conn.fetch(
            "SELECT class, upper_bound - lower_bound AS width, upper_bound"
            " FROM jobq_history_partitions ORDER BY class, lower_bound"
        )
        for cls in ("done", "failed"):
            mine = [r for r in leaves if r["class"] == cls]
            oldest = mine[0]
            assert oldest["upper_bound"] == await conn.fetchval(
                "SELECT date_bin('1 day', now() - interval '30 days',"
                " timestamptz '2000-01-01 00:00:00+00')"
            )
            assert {r["width"].days for r in mine[1:]} == {1}
        assert await conn.fetchval("SELECT count(*) FROM jobs_history") == 300
    finally:
        await conn.close()


async def test_the_move_does_not_count_moved_jobs_as_finished_again(v3_dsn: str) -> None:
    conn = await db.connect(v3_dsn)
    try:
        await conn.fetch(_SEED_HISTORY, 300)
        await schema.migrate(conn, pre_deploy=True)
        queue = Queue(await db.create_pool(v3_dsn, min_size=1, max_size=2))
        try:
            job = (await queue.enqueue(NewJob(kind="echo"))).job
            (claimed,) = await queue.claim("w", ["echo"], ["default"], 1, lease_seconds=30)
            assert claimed.lease_token is not None
            assert await queue.complete(Lease(job.id, claimed.lease_token), None)
        finally:
            await queue.pool.close()
        before = await conn.fetchval("SELECT sum(n) FROM jobq_finished_minutes")
        await schema.migrate(conn)
        assert await conn.fetchval("SELECT count(*) FROM jobs_history") == 301
        assert await conn.fetchval("SELECT sum(n) FROM jobq_finished_minutes") == before == 1
    finally:
        await conn.close()


async def test_the_move_prints_its_progress(v3_dsn: str) -> None:
    conn = await db.connect(v3_dsn)
    try:
        await conn.fetch(_SEED_HISTORY, 30)
        notices: list[tuple[str, str]] = []
        await schema.migrate(conn, notice=lambda m, text: notices.append((m.label, text)))
        labels = {label for label, _ in notices}
        texts = [text for label, text in notices if label.startswith("0006")]
        assert "0006_move_history" in labels  # later steps may say things of their own
        assert texts[0].startswith("moving 30 finished job(s)")
        assert texts[-1].startswith("moved 30 finished job(s)")
    finally:
        await conn.close()


async def test_the_move_gives_up_within_the_lock_timeout_and_resumes_when_run_again(
    v3_dsn: str,
) -> None:
    conn = await db.connect(v3_dsn)
    holder = await db.connect(v3_dsn)
    try:
        ids = [r["id"] for r in await conn.fetch(_SEED_HISTORY, 100)]
        await schema.migrate(conn, pre_deploy=True)
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", ids[0])
            started = time.monotonic()
            with pytest.raises(schema.MigrationError, match="run `jobq migrate` again"):
                await schema.migrate(conn)
            assert time.monotonic() - started < 10
            # Every other row moved; only the locked one waits in the live table.
            assert [r["id"] for r in await conn.fetch("SELECT id FROM jobs")] == [ids[0]]
        assert await schema.migrate(conn) == POST_DEPLOY
        assert await conn.fetchval("SELECT count(*) FROM jobs") == 0
        assert sorted(r["id"] for r in await conn.fetch(_ALL_IDS)) == sorted(ids)
    finally:
        await holder.close()
        await conn.close()


async def test_dropping_the_v3_indexes_gives_up_within_the_lock_timeout_blocking_nobody(
    v3_dsn: str,
) -> None:
    conn = await db.connect(v3_dsn)
    holder = await db.connect(v3_dsn)
    pool = await db.create_pool(v3_dsn, min_size=1, max_size=2)
    try:
        await schema.migrate(conn, target=POST_DEPLOY[0])
        # What a deploy applies before this version starts: every pre-deploy step.
        await schema.migrate(conn, pre_deploy=True)
        queue = Queue(pool)
        # A long transaction that read jobs: a concurrent index drop must wait for it.
        async with holder.transaction():
            await holder.execute("SELECT count(*) FROM jobs")
            migrating = asyncio.create_task(schema.migrate(conn))
            await asyncio.sleep(0.5)  # the drop is waiting now; writers must not be
            started = time.monotonic()
            await queue.enqueue(NewJob(kind="echo"))
            assert time.monotonic() - started < 0.5
            with pytest.raises(schema.MigrationError, match="waited 2s for a lock"):
                await migrating
            assert POST_DEPLOY[1] not in await schema.applied(conn)
        assert await schema.migrate(conn) == [v for v in POST_DEPLOY if v > POST_DEPLOY[0]]
        left = await conn.fetchval(
            "SELECT count(*) FROM pg_index WHERE indrelid = 'jobs'::regclass"
            " AND indexrelid::regclass::text = ANY($1::text[])",
            list(V3_INDEXES),
        )
        assert left == 0
    finally:
        await pool.close()
        await holder.close()
        await conn.close()


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
