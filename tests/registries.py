"""Handlers run by worker processes in tests (`python -m jobq worker tests.registries:...`)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, TextIO

import asyncpg

from jobq import db
from jobq.registry import JobContext, Registry

recording = Registry()

_pool: asyncpg.Pool | None = None
_lock = asyncio.Lock()


async def _executions_pool() -> asyncpg.Pool:
    global _pool
    async with _lock:
        if _pool is None:
            # jobq's pool: it honours JOBQ_POOLER, as the worker running these handlers does.
            _pool = await db.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=4)
        assert _pool is not None
        return _pool


EXECUTIONS_DDL = """
CREATE TABLE IF NOT EXISTS executions (
    job_id uuid NOT NULL,
    attempt int NOT NULL,
    pid int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


@recording.handler("record")
async def record(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Writes one row per execution, then sleeps `sleep_ms` if asked."""
    pool = await _executions_pool()
    await pool.execute(
        "INSERT INTO executions (job_id, attempt, pid) VALUES ($1, $2, $3)",
        ctx.id,
        ctx.attempt,
        os.getpid(),
    )
    if payload.get("sleep_ms"):
        await asyncio.sleep(payload["sleep_ms"] / 1000)


@recording.handler("sleep")
async def sleep(ctx: JobContext, payload: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + float(payload.get("seconds", 1))
    while loop.time() < deadline:
        ctx.raise_if_cancelled()
        await asyncio.sleep(0.05)


@recording.handler("sync_sleep")
def sync_sleep(ctx: JobContext, payload: dict[str, Any]) -> None:
    """A plain function that sleeps `seconds`, deaf to cancel requests."""
    time.sleep(float(payload.get("seconds", 1)))


_marks: TextIO | None = None


@recording.handler("mark")
def mark(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Appends the job id to a file of this process's own in $JOBQ_TEST_MARKS: a record of
    every execution that costs no database round trip."""
    global _marks
    if _marks is None:
        _marks = open(  # noqa: SIM115 - one file for the life of the process
            os.path.join(os.environ["JOBQ_TEST_MARKS"], str(os.getpid())), "a", buffering=1
        )
    _marks.write(f"{ctx.id}\n")
