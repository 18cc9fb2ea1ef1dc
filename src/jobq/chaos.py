"""Chaos run: workers SIGKILLed, the database restarted, and a check that no job was lost.

`jobq chaos --jobs N` (or `make chaos N=...`) runs it against a PostgreSQL server of its own,
started in a temporary directory, so the server can be restarted mid-run:

1. enqueue N jobs of the `chaos` kind: each sleeps 0-20 ms and records its execution (job id,
   attempt, worker pid) in a side table;
2. run `workers` worker processes; about every `kill_interval` seconds SIGKILL a random one and
   start a replacement;
3. once a third of the jobs are done, restart PostgreSQL (fast shutdown, then start again on
   the same socket, so every DSN stays valid);
4. stop when every job is terminal or the deadline passes, then check: every job succeeded,
   none lost, none stuck running, each executed at least once, and every execution other than
   the successful one is explained by a killed worker or an expired lease.

The worker processes use short leases and heartbeats (environment variables below); the
defaults of a normal deployment are untouched.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from jobq import db, schema
from jobq.embedded import TEST_SETTINGS, EmbeddedPostgres
from jobq.queue import NewJob, Queue
from jobq.registry import JobContext, Registry

KIND = "chaos"
QUEUE = "chaos"
SIDE_TABLE = "jobq_chaos_runs"
# Enough attempts that rescues never exhaust a job: the run checks loss, not retry limits.
MAX_ATTEMPTS = 1000

# Short leases and retry delays so that a killed worker's jobs come back within seconds
# (a rescued job waits its backoff before it runs again).
WORKER_ENV = {
    "JOBQ_LEASE_SECONDS": "2",
    "JOBQ_RETRY_BASE_SECONDS": "0.2",
    "JOBQ_RETRY_CAP_SECONDS": "2",
    "JOBQ_HEARTBEAT_SECONDS": "0.4",
    "JOBQ_RESCUE_INTERVAL_SECONDS": "0.5",
    "JOBQ_POLL_INTERVAL_SECONDS": "0.2",
    "JOBQ_LOG_LEVEL": "ERROR",
}

_CREATE_SIDE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {SIDE_TABLE} (
    job_id  uuid        NOT NULL,
    attempt integer     NOT NULL,
    pid     integer     NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_id, attempt, pid)
)
"""

# -- the handler, run inside the worker processes -------------------------------------------

registry = Registry()
_pool: asyncpg.Pool | None = None
_pool_lock = asyncio.Lock()


async def _side_pool() -> asyncpg.Pool:
    global _pool
    async with _pool_lock:
        if _pool is None:
            _pool = await db.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=4)
    return _pool


@registry.handler(KIND)
async def chaos_job(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Record this execution (retrying through outages), then sleep `ms` milliseconds."""
    deadline = time.monotonic() + 60
    while True:
        try:
            pool = await _side_pool()
            await pool.execute(
                f"INSERT INTO {SIDE_TABLE} (job_id, attempt, pid) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING",
                ctx.id,
                ctx.attempt,
                os.getpid(),
            )
            break
        except Exception as exc:
            if not db.is_unavailable(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    await asyncio.sleep(float(payload.get("ms", 0)) / 1000)
    return {"pid": os.getpid()}


# -- the run ----------------------------------------------------------------------------------


@dataclass
class ChaosReport:
    jobs: int
    workers: int
    kills: int = 0
    replacements: int = 0
    exited_on_their_own: int = 0
    db_restarts: int = 0
    elapsed_seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    executions: int = 0
    executed_jobs: int = 0
    lost: int = 0
    stuck_running: int = 0
    duplicates: int = 0
    duplicates_killed: int = 0
    duplicates_lease_expired: int = 0
    duplicates_unexplained: int = 0
    finished: bool = False

    @property
    def ok(self) -> bool:
        return (
            self.finished
            and self.statuses.get("succeeded", 0) == self.jobs
            and self.lost == 0
            and self.stuck_running == 0
            and self.executed_jobs == self.jobs
            and self.duplicates_unexplained == 0
        )

    def summary(self) -> str:
        return "\n".join(
            [
                f"jobs                      {self.jobs}",
                f"worker processes          {self.workers}",
                f"workers SIGKILLed         {self.kills}",
                f"replacements started      {self.replacements}",
                f"workers that exited       {self.exited_on_their_own}",
                f"database restarts         {self.db_restarts}",
                f"elapsed                   {self.elapsed_seconds:.1f}s",
                f"final statuses            {self.statuses}",
                f"executions                {self.executions}",
                f"jobs executed             {self.executed_jobs}",
                f"duplicates                {self.duplicates}",
                f"  after a killed worker   {self.duplicates_killed}",
                f"  after a lease expired   {self.duplicates_lease_expired}",
                f"  unexplained             {self.duplicates_unexplained}",
                f"lost                      {self.lost}",
                f"stuck running             {self.stuck_running}",
                f"result                    {'OK' if self.ok else 'FAILED'}",
            ]
        )


class _Fleet:
    """The worker processes, and the pids of those killed."""

    def __init__(self, dsn: str, concurrency: int, log_dir: Path) -> None:
        self.dsn = dsn
        self.concurrency = concurrency
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.killed: set[int] = set()

    def spawn(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "DATABASE_URL": self.dsn, **WORKER_ENV}
        log = open(self.log_dir / f"worker-{len(self.killed)}-{time.time_ns()}.log", "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "jobq",
                    "worker",
                    "jobq.chaos:registry",
                    "--queues",
                    QUEUE,
                    "--concurrency",
                    str(self.concurrency),
                    "--shutdown-grace",
                    "5",
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    def kill_random(self, rng: random.Random) -> int | None:
        alive = [p for p in self.procs if p.poll() is None]
        if not alive:
            return None
        victim = rng.choice(alive)
        victim.kill()
        victim.wait()
        self.killed.add(victim.pid)
        self.procs.remove(victim)
        return victim.pid

    def reap(self) -> int:
        """Forget processes that exited by themselves; returns how many."""
        gone = [p for p in self.procs if p.poll() is not None]
        for p in gone:
            self.procs.remove(p)
        return len(gone)

    def stop(self, timeout: float = 15.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


async def _retrying(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Run a database call of the runner itself, waiting out the restart it caused."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await fn()
        except Exception as exc:
            if not db.is_unavailable(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _prepare(dsn: str, n: int, rng: random.Random) -> None:
    conn = await db.connect(dsn)
    try:
        await schema.migrate(conn)
        await conn.execute(_CREATE_SIDE_TABLE)
    finally:
        await conn.close()
    pool = await db.create_pool(dsn, min_size=1, max_size=2)
    try:
        queue = Queue(pool)
        for start in range(0, n, 1000):
            await queue.enqueue_many(
                [
                    NewJob(
                        kind=KIND,
                        queue=QUEUE,
                        payload={"ms": rng.randint(0, 20)},
                        max_attempts=MAX_ATTEMPTS,
                    )
                    for _ in range(min(1000, n - start))
                ]
            )
    finally:
        await pool.close()


# Every job, live or finished: a job is in exactly one of the two tables.
_ALL_JOBS = """(
    SELECT id, queue, status, attempts, errors FROM jobs
    UNION ALL
    SELECT id, queue, status, attempts, errors FROM jobs_history
)"""

_ANALYSIS = f"""
WITH runs AS (
    SELECT r.job_id, r.attempt, r.pid, j.attempts AS final_attempt, j.errors
    FROM {SIDE_TABLE} AS r JOIN {_ALL_JOBS} AS j ON j.id = r.job_id
), earlier AS (
    -- Every execution but the one whose outcome stands.
    SELECT * FROM runs WHERE attempt < final_attempt
)
SELECT
    (SELECT count(*) FROM {SIDE_TABLE}) AS executions,
    (SELECT count(DISTINCT job_id) FROM {SIDE_TABLE}) AS executed_jobs,
    (SELECT count(*) FROM earlier) AS duplicates,
    (SELECT count(*) FROM earlier WHERE pid = ANY($1::int[])) AS dup_killed,
    (SELECT count(*) FROM earlier
      WHERE NOT pid = ANY($1::int[])
        AND EXISTS (SELECT 1 FROM jsonb_array_elements(errors) AS e
                    WHERE (e->>'attempt')::int = attempt
                      AND e->>'error' LIKE 'worker lost:%')) AS dup_lease
"""


async def _analyse(dsn: str, report: ChaosReport, killed: set[int]) -> None:
    conn = await db.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT status, count(*)::int AS n FROM {_ALL_JOBS} AS j WHERE queue = $1"
            " GROUP BY status",
            QUEUE,
        )
        report.statuses = {r["status"]: r["n"] for r in rows}
        total = sum(report.statuses.values())
        report.lost = report.jobs - total
        report.stuck_running = report.statuses.get("running", 0)
        row = await conn.fetchrow(_ANALYSIS, sorted(killed))
        assert row is not None
        report.executions = row["executions"]
        report.executed_jobs = row["executed_jobs"]
        report.duplicates = row["duplicates"]
        report.duplicates_killed = row["dup_killed"]
        report.duplicates_lease_expired = row["dup_lease"]
        report.duplicates_unexplained = (
            report.duplicates - report.duplicates_killed - report.duplicates_lease_expired
        )
    finally:
        await conn.close()


async def run_chaos(
    n: int,
    *,
    workers: int = 4,
    concurrency: int = 2,
    kill_interval: float = 1.0,
    restart_database: bool = True,
    timeout: float = 300.0,
    seed: int | None = None,
    work_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> ChaosReport:
    """Run the chaos scenario on a PostgreSQL server of its own; returns the figures.

    Call it from the main thread: the server is a child that dies with the thread that
    started it.
    """
    say = progress or (lambda _msg: None)
    rng = random.Random(seed)
    own_dir = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="jobq-chaos-")) if work_dir is None else work_dir
    (root / "logs").mkdir(parents=True, exist_ok=True)
    server = EmbeddedPostgres(root / "db", settings=TEST_SETTINGS)
    report = ChaosReport(jobs=n, workers=workers)
    fleet: _Fleet | None = None
    try:
        dsn = server.start()
        await _prepare(dsn, n, rng)
        say(f"enqueued {n} jobs; starting {workers} workers")
        fleet = _Fleet(dsn, concurrency, root / "logs")
        started = time.monotonic()
        for _ in range(workers):
            fleet.spawn()
        pool = await db.create_pool(dsn, min_size=0, max_size=1)
        try:
            next_kill = started + kill_interval
            deadline = started + timeout
            while time.monotonic() < deadline:
                live = await _retrying(
                    lambda: pool.fetchval(
                        "SELECT count(*) FROM jobs WHERE queue = $1"
                        " AND status IN ('queued', 'running', 'retrying')",
                        QUEUE,
                    )
                )
                if live == 0:
                    report.finished = True
                    break
                if restart_database and not report.db_restarts and live <= n * 2 // 3:
                    say(f"restarting PostgreSQL ({n - live} of {n} jobs done)")
                    server.restart()
                    report.db_restarts += 1
                now = time.monotonic()
                if now >= next_kill:
                    pid = fleet.kill_random(rng)
                    if pid is not None:
                        report.kills += 1
                        say(f"SIGKILLed worker {pid} ({n - live} of {n} jobs done)")
                    next_kill = now + kill_interval * rng.uniform(0.5, 1.5)
                exited = fleet.reap()
                report.exited_on_their_own += exited
                while len(fleet.procs) < workers:
                    fleet.spawn()
                    report.replacements += 1
                await asyncio.sleep(0.05)
        finally:
            await pool.close()
        report.elapsed_seconds = time.monotonic() - started
        fleet.stop()
        await _analyse(dsn, report, fleet.killed)
        return report
    finally:
        if fleet is not None:
            fleet.stop(timeout=5)
        server.stop()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


def main_sync(n: int, **kwargs: Any) -> ChaosReport:
    """Entry point for the CLI: runs the scenario in a fresh event loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is not on every platform
        return asyncio.run(run_chaos(n, **kwargs))
    return uvloop.run(run_chaos(n, **kwargs))
