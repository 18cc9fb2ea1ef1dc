"""Shared test helpers: waiting on conditions with a deadline, and worker processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent

# Every job, live or in history (a job is in exactly one of the two tables), for tests that
# read jobs in SQL: f"SELECT status, count(*) FROM {ALL_JOBS} GROUP BY status".
_BOTH = (
    "id, kind, queue, payload, status, priority, attempts, max_attempts, run_at,"
    " idempotency_key, cancel_requested, lease_owner, last_error, errors, result, created_at,"
    " started_at, finished_at"
)
ALL_JOBS = f"(SELECT {_BOTH} FROM jobs UNION ALL SELECT {_BOTH} FROM jobs_history) AS all_jobs"
# No jobs, live or finished, nor their keys and counts (TRUNCATE fires no trigger).
NO_JOBS = (
    "TRUNCATE jobs, jobs_history, jobq_idempotency_keys, jobq_counts, jobq_count_deltas,"
    " jobq_finished_minutes"
)


async def wait_for(
    predicate: Callable[[], Awaitable[T]], timeout: float = 15.0, interval: float = 0.02
) -> T:
    """Poll an async predicate until it returns something truthy; fail at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(interval)


def worker_process(
    dsn: str, registry: str, *args: str, env: dict[str, str] | None = None, **popen: Any
) -> subprocess.Popen[bytes]:
    """`jobq worker` in a child process against `dsn`."""
    full_env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "PYTHONPATH": str(ROOT),
        "JOBQ_LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "jobq", "worker", registry, *args],
        env=full_env,
        cwd=ROOT,
        **popen,
    )
