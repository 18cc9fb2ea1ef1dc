"""Built-in example handlers, run by `jobq dev` and `make run`: `jobq.examples:registry`."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobq.registry import JobContext, Registry

registry = Registry()


class SleepPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(ge=0, le=86400, description="How long to sleep.")


class FlakyPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail_times: int = Field(ge=0, le=1000, description="Attempts that fail before one succeeds.")


class FailPayload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str = Field(default="failed on purpose", max_length=10_000)


@registry.handler("echo")
async def echo(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Returns its payload as the result."""
    return payload


@registry.handler("sleep")
async def sleep(ctx: JobContext, payload: SleepPayload) -> dict[str, Any]:
    """Sleeps, looking for a cancel request at least every 50 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + payload.seconds
    while (left := deadline - loop.time()) > 0:
        ctx.raise_if_cancelled()
        await asyncio.sleep(min(0.05, left))
    ctx.raise_if_cancelled()
    return {"slept": payload.seconds}


@registry.handler("flaky")
async def flaky(ctx: JobContext, payload: FlakyPayload) -> dict[str, Any]:
    """Raises on its first `fail_times` attempts, then succeeds."""
    if ctx.attempt <= payload.fail_times:
        raise RuntimeError(f"flaky: attempt {ctx.attempt} of {payload.fail_times} planned failures")
    return {"succeeded_on_attempt": ctx.attempt}


@registry.handler("fail")
async def fail(ctx: JobContext, payload: FailPayload) -> None:
    """Always raises."""
    raise RuntimeError(payload.message)
