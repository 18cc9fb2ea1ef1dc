"""Handlers the benchmark worker processes run (`jobq worker bench.handlers:registry`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from jobq import JobContext, Middleware, Registry
from jobq.middleware import CallNext

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


class _PassThrough(Middleware):
    async def run(self, ctx: JobContext, call_next: CallNext) -> Any:
        return await call_next()


# The same handlers behind one middleware that does nothing: what a middleware costs by itself
# (bench/hooks.py).
with_middleware = Registry(middleware=[_PassThrough()])
for _handler in registry:
    with_middleware.handler(_handler.kind)(_handler.fn)


def otel_sdk() -> None:
    """An OpenTelemetry SDK that records every span and exports it nowhere (bench/hooks.py):
    the cost of making spans, not of shipping them."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    trace.set_tracer_provider(provider)
