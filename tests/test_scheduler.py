"""The scheduler against a real PostgreSQL: one job per tick however many passes and workers
run it, the catch-up window, DST, schedules removed from the code, the listings."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from jobq import maintenance, stats
from jobq.api import create_app
from jobq.maintenance import Scheduler
from jobq.periodic import Schedule
from jobq.queue import Queue
from jobq.settings import Settings
from tests.helpers import ALL_JOBS, wait_for, worker_process


class Clock:
    """Time the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def at(self, *args: int) -> None:
        self.now = datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@pytest.fixture
async def clean(queue: Queue) -> Queue:
    await queue.pool.execute("TRUNCATE jobq_schedules")
    return queue


def scheduler(queue: Queue, clock: Callable[[], datetime], *schedules: Schedule) -> Scheduler:
    return Scheduler(queue, schedules, clock=clock)


async def ticks_enqueued(queue: Queue, kind: str) -> list[datetime]:
    """The tick (run_at) of every job of `kind`, live or finished, in order."""
    rows = await queue.pool.fetch(
        f"SELECT run_at FROM {ALL_JOBS} WHERE kind = $1 ORDER BY run_at", kind
    )
    return [r["run_at"] for r in rows]


async def test_many_concurrent_passes_enqueue_each_tick_once(clean: Queue) -> None:
    s = Schedule(name="often", kind="often", every=timedelta(seconds=10))
    clock = Clock(datetime(2026, 6, 1, 12, 0, 5, tzinfo=UTC))
    passes = [scheduler(clean, clock, s) for _ in range(20)]
    await asyncio.gather(*(p.tick() for p in passes))  # the first declares the schedule
    for n in range(1, 6):
        clock.now += timedelta(seconds=10)
        made = await asyncio.gather(*(p.tick() for p in passes))
        assert sum(len(m) for m in made) == 1, f"tick {n}: {made}"
    start = datetime(2026, 6, 1, 12, 0, 10, tzinfo=UTC)
    assert await ticks_enqueued(clean, "often") == [
        start + timedelta(seconds=10 * i) for i in range(5)
    ]


@contextlib.asynccontextmanager
async def executions_table(pool: asyncpg.Pool) -> AsyncIterator[None]:
    await pool.execute("DROP TABLE IF EXISTS executions")
    await pool.execute(
        "CREATE TABLE executions (job_id uuid NOT NULL, attempt int NOT NULL, pid int NOT NULL,"
        " at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    try:
        yield
    finally:
        await pool.execute("DROP TABLE executions")


async def test_three_worker_processes_run_each_tick_exactly_once(clean: Queue, dsn: str) -> None:
    async with executions_table(clean.pool):
        workers = [
            worker_process(dsn, "tests.periodic_registries:every_second",
                           env={"JOBQ_POLL_INTERVAL_SECONDS": "0.2"})
            for _ in range(3)
        ]  # fmt: skip
        try:

            async def enough() -> bool:
                return len(await ticks_enqueued(clean, "tick.record")) >= 4

            await wait_for(enough, timeout=30)
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                assert await asyncio.to_thread(w.wait, 30) == 0
        runs = await clean.pool.fetch(
            f"SELECT all_jobs.run_at, count(e.job_id) AS runs FROM {ALL_JOBS}"
            " LEFT JOIN executions AS e ON e.job_id = all_jobs.id"
            " WHERE all_jobs.kind = 'tick.record'"
            " GROUP BY all_jobs.id, all_jobs.run_at ORDER BY all_jobs.run_at"
        )
        pids = await clean.pool.fetchval("SELECT count(DISTINCT pid) FROM executions")
    ticks = [r["run_at"] for r in runs]
    # One job per tick, consecutive seconds with none missed, each run once.
    assert len(set(ticks)) == len(ticks)
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ticks)), ticks
    assert all(r["runs"] <= 1 for r in runs)
    assert sum(r["runs"] for r in runs) >= len(ticks) - 1  # the last may be cut by the stop
    assert pids >= 1


async def test_a_schedule_name_two_apps_declare_differently_is_a_warning_once(
    clean: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(datetime(2026, 6, 1, 12, 0, 5, tzinfo=UTC))
    mine = scheduler(clean, clock, Schedule(name="cleanup", kind="cleanup", queue="qa",
                                            every=timedelta(seconds=10)))  # fmt: skip
    theirs = scheduler(clean, clock, Schedule(name="cleanup", kind="cleanup", queue="qb",
                                              every=timedelta(seconds=10)))  # fmt: skip
    await theirs.tick()
    with caplog.at_level(logging.WARNING, logger="jobq.worker"):
        await mine.tick()
        await theirs.tick()
        await mine.tick()
    warned = [r.getMessage() for r in caplog.records if "declared differently" in r.getMessage()]
    assert len(warned) == 2, warned  # once by each, not at every pass
    assert "on qb there" in warned[0] and "on qa here" in warned[0]


async def test_a_tick_missed_within_the_catch_up_window_is_enqueued_once(clean: Queue) -> None:
    s = Schedule(name="m", kind="minutely", every=timedelta(minutes=1),
                 catch_up=timedelta(minutes=10))  # fmt: skip
    clock = Clock(datetime(2026, 6, 1, 10, 0, 30, tzinfo=UTC))
    await scheduler(clean, clock, s).tick()
    # Every worker is down from 10:00:30 to 10:07:20; the ones that come back catch up once.
    clock.at(2026, 6, 1, 10, 7, 20)
    back = [scheduler(clean, clock, s) for _ in range(3)]
    for _ in range(3):
        await asyncio.gather(*(b.tick() for b in back))
    assert await ticks_enqueued(clean, "minutely") == [datetime(2026, 6, 1, 10, 7, tzinfo=UTC)]
    clock.at(2026, 6, 1, 10, 8, 1)
    await back[0].tick()
    assert len(await ticks_enqueued(clean, "minutely")) == 2


async def test_ticks_missed_beyond_the_catch_up_window_are_not_back_filled(
    clean: Queue,
) -> None:
    s = Schedule(name="d", kind="daily", cron="0 3 * * *", catch_up=timedelta(hours=1))
    clock = Clock(datetime(2026, 6, 1, 2, 0, tzinfo=UTC))
    await scheduler(clean, clock, s).tick()
    # Down over 03:00 until 04:30, past the hour of catch-up: that day's run is lost.
    clock.at(2026, 6, 1, 4, 30)
    back = scheduler(clean, clock, s)
    assert await back.tick() == []
    clock.at(2026, 6, 2, 3, 0, 1)
    assert len(await back.tick()) == 1
    assert await ticks_enqueued(clean, "daily") == [datetime(2026, 6, 2, 3, tzinfo=UTC)]


@pytest.mark.parametrize(
    ("night", "expected"),
    [
        # Spring forward: 02:30 does not exist; the run is at 03:00 CEST, once.
        (datetime(2026, 3, 28, 22, tzinfo=UTC), datetime(2026, 3, 29, 1, 0, tzinfo=UTC)),
        # Fall back: 02:30 happens twice; the run is at the first, 02:30 CEST, once.
        (datetime(2026, 10, 24, 22, tzinfo=UTC), datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),
    ],
    ids=["spring-forward", "fall-back"],
)
async def test_a_daily_schedule_runs_once_on_a_dst_night(
    clean: Queue, night: datetime, expected: datetime
) -> None:
    s = Schedule(name="nightly", kind="nightly", cron="30 2 * * *", tz="Europe/Paris")
    clock = Clock(night)
    passes = [scheduler(clean, clock, s) for _ in range(2)]
    while clock.now < night + timedelta(hours=8):
        await asyncio.gather(*(p.tick() for p in passes))
        clock.now += timedelta(minutes=5)
    assert await ticks_enqueued(clean, "nightly") == [expected]


async def test_a_schedule_removed_from_the_code_stops_and_leaves_the_listing(
    clean: Queue,
) -> None:
    kept = Schedule(name="kept", kind="kept", every=timedelta(minutes=1))
    removed = Schedule(name="removed", kind="removed", every=timedelta(minutes=1))
    clock = Clock(datetime(2026, 6, 1, 10, 0, 30, tzinfo=UTC))
    await scheduler(clean, clock, kept, removed).tick()
    clock.at(2026, 6, 1, 10, 1, 1)
    await scheduler(clean, clock, kept, removed).tick()
    # The new deploy declares `kept` only.
    deployed = scheduler(clean, clock, kept)
    for minute in range(2, 5):
        clock.at(2026, 6, 1, 10, minute, 1)
        await deployed.tick()
    assert len(await ticks_enqueued(clean, "removed")) == 1
    assert len(await ticks_enqueued(clean, "kept")) == 4
    listed = [s.name for s in await clean.schedules(now=clock.now)]
    assert listed == ["kept"]  # `removed` was last declared 3 minutes ago


async def test_schedules_are_listed_with_their_next_run_in_stats(
    clean: Queue, pool: asyncpg.Pool
) -> None:
    s = Schedule(name="report", kind="report.daily", cron="30 2 * * *", tz="Europe/Paris")
    await Scheduler(clean, [s]).tick()  # the database's clock
    app = create_app(Settings(), pool=pool)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        body: dict[str, Any] = (await client.get("/stats")).json()
    (listed,) = body["schedules"]
    assert listed["name"] == "report"
    assert listed["spec"] == "cron 30 2 * * * (Europe/Paris)"
    assert listed["last_run_at"] is None
    next_run = datetime.fromisoformat(listed["next_run_at"])
    assert next_run == s.next_after(datetime.now(UTC))


def test_a_worker_without_schedules_runs_no_scheduler(queue: Queue) -> None:
    names = [s.name for s in maintenance.services(queue, Settings())]
    assert "scheduler" not in names
    with_one = maintenance.services(
        queue, Settings(), schedules=[Schedule(name="s", kind="k", every=timedelta(seconds=5))]
    )
    assert "scheduler" in [s.name for s in with_one]


async def test_jobq_status_lists_schedules_with_their_next_run(clean: Queue) -> None:
    s = Schedule(name="ping", kind="ping", every=timedelta(minutes=1))
    await Scheduler(clean, [s]).tick()
    report = stats.render_text(await stats.collect(clean))
    (line,) = [x for x in report.splitlines() if x.startswith("schedule:")]
    assert line.startswith("schedule: ping (ping, every 60s): next run 20")
