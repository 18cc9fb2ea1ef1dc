"""Handlers for the worker processes of the concurrency and fencing tests."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from jobq.registry import JobContext, Registry

registry = Registry()


@registry.handler("slow_first")
async def slow_first(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    """The first attempt takes `first` seconds; later attempts return at once."""
    if ctx.attempt == 1:
        await asyncio.sleep(float(payload.get("first", 3)))
    return {"pid": os.getpid(), "attempt": ctx.attempt}


@registry.handler("echo")
async def echo(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    return payload
