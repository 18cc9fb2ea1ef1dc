"""Handlers the benchmark worker processes run (`jobq worker bench.handlers:registry`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from jobq import JobContext, Registry

registry = Registry()


@registry.handler("noop")
async def noop(ctx: JobContext, payload: dict[str, Any]) -> None:
    return None


@registry.handler("latency")
async def latency(ctx: JobContext, payload: dict[str, Any]) -> dict[str, float]:
    # CLOCK_MONOTONIC is system-wide: t0 was taken in the producer just before its enqueue call.
    return {"lat_ms": (time.monotonic() - payload["t0"]) * 1000.0}


@registry.handler("sleep")
async def sleep(ctx: JobContext, payload: dict[str, Any]) -> None:
    await asyncio.sleep(payload.get("seconds", 60.0))
