"""Chaos: workers SIGKILLed about every second, PostgreSQL restarted mid-run, nothing lost.

The scenario lives in `jobq.chaos` (also `jobq chaos` / `make chaos N=...`); the test runs it
on a PostgreSQL server of its own, which it restarts.
"""

from __future__ import annotations

import pytest

from jobq.chaos import run_chaos

pytestmark = pytest.mark.timeout(600)


async def test_no_job_is_lost_when_workers_are_killed_and_the_database_restarts(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    report = await run_chaos(
        2000,
        workers=4,
        kill_interval=1.0,
        restart_database=True,
        timeout=300,
        work_dir=tmp_path_factory.mktemp("chaos"),
        progress=print,
    )
    print(report.summary())
    assert report.finished, "jobs were still live at the deadline"
    assert report.db_restarts == 1
    assert report.kills >= 1
    assert report.lost == 0
    assert report.stuck_running == 0
    assert report.statuses == {"succeeded": 2000}
    assert report.executed_jobs == 2000
    # A job ran more than once only after its worker was killed or its lease expired.
    assert report.duplicates_unexplained == 0
    assert report.duplicates == report.duplicates_killed + report.duplicates_lease_expired
