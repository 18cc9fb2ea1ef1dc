"""Registries of the flow-control benchmarks (`jobq worker bench.flow_handlers:NAME`).

Every handler appends "start end key enqueued" (Unix seconds) to a file of its process's own
in $JOBQ_FLOW_SPANS: what bench/flow.py checks limits with, recorded by the handler itself,
not read from jobq's tables."""

from __future__ import annotations

import asyncio
import atexit
import os
import time
from typing import Any, TextIO

from jobq import JobContext, Registry

_out: TextIO | None = None


async def _span(ctx: JobContext, payload: dict[str, Any]) -> None:
    global _out
    start = time.time()
    if payload.get("ms"):
        await asyncio.sleep(payload["ms"] / 1000)
    if _out is None:
        path = os.path.join(os.environ["JOBQ_FLOW_SPANS"], str(os.getpid()))
        _out = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - one file per process
    _out.write(f"{start} {time.time()} {payload.get('key', '-')} {payload.get('t', 0)}\n")


def _flush_at_exit() -> None:
    if _out is not None:
        _out.flush()


atexit.register(_flush_at_exit)


def _registry(**limits: Any) -> Registry:
    registry = Registry()
    queue_limits = limits.pop("queue", None)
    if queue_limits:
        registry.queue("default", **queue_limits)
    registry.handler("span", **limits)(_span)
    return registry


unlimited = _registry()
per_key = _registry(concurrency_key="key", max_per_key=5)
global20 = _registry(max_concurrency=20)
rate50 = _registry(rate_limit="50/s")
fair = _registry(queue={"fair": True})
