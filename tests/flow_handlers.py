"""Handlers of the flow-control tests' worker processes: each run records when it started and
finished in a table of its own (`spans`), written by the handler, not by jobq."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg

from jobq.registry import JobContext, Registry

SPANS_DDL = """
CREATE TABLE IF NOT EXISTS spans (
    job_id uuid NOT NULL,
    tenant text,
    pid int NOT NULL,
    started timestamptz NOT NULL,
    finished timestamptz
)
"""

registry = Registry()
registry.queue("capped", max_concurrency=3)
_pool: asyncpg.Pool | None = None
_lock = asyncio.Lock()


async def _spans() -> asyncpg.Pool:
    global _pool
    async with _lock:
        if _pool is None:
            _pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=4)
        return _pool


async def _span(ctx: JobContext, payload: dict[str, Any]) -> None:
    pool = await _spans()
    started = await pool.fetchval("SELECT clock_timestamp()")
    await asyncio.sleep(float(payload.get("seconds", 0.05)))
    await pool.execute(
        "INSERT INTO spans VALUES ($1, $2, $3, $4, clock_timestamp())",
        ctx.id,
        payload.get("tenant"),
        os.getpid(),
        started,
    )


@registry.handler("span")
async def span(ctx: JobContext, payload: dict[str, Any]) -> None:
    await _span(ctx, payload)


@registry.handler("keyed", concurrency_key="tenant", max_per_key=2)
async def keyed(ctx: JobContext, payload: dict[str, Any]) -> None:
    await _span(ctx, payload)
