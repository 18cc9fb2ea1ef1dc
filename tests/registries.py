"""Handlers run by worker processes in tests (`python -m jobq worker tests.registries:...`)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import asyncpg

from jobq.registry import JobContext, Registry

recording = Registry()

_pool: asyncpg.Pool | None = None
_lock = asyncio.Lock()


async def _executions_pool() -> asyncpg.Pool:
    global _pool
    async with _lock:
        if _pool is None:
            _pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=4)
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
