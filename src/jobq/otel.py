"""OpenTelemetry: a span per enqueue and per run, linked through the trace context stored on
the job. Needs the `otel` extra (`pip install 'jobq[otel]'`: opentelemetry-api); your own
OpenTelemetry SDK set-up decides where spans go.

Off unless turned on, and then free of cost when off: nothing here is imported or registered.
Turn it on with `JOBQ_OTEL=1` (for `jobq worker`, `jobq api`, `jobq dev`, and any `Worker` or
`create_app` built from `Settings.from_env()`), or `jobq.otel.instrument()` in your own
process (before its workers start): one `Middleware`, installed process-wide.

What it records, following the OpenTelemetry semantic conventions for messaging:
- an enqueue (`Queue.enqueue*`, `jobq.txn`, `POST /jobs`, `POST /jobs/batch`): a PRODUCER span `send
  {queue}`, a child of the current span (over HTTP, of the request's `traceparent` when the
  API is not instrumented otherwise); its context (W3C `traceparent`/`tracestate`, through
  the configured propagator) is stored with each job, in `jobs.trace_context`;
- a run (each attempt): a CONSUMER span `process {queue}` with a link to the span that
  enqueued the job, current while the handler runs (its own spans are children, in sync
  handlers too); status ERROR with the exception recorded when the attempt fails (not for
  a cancel on request, `jobq.cancelled`, or a snooze, `jobq.snooze_seconds`).
Attributes: `messaging.system` "jobq", `messaging.operation.type` ("send" / "process"),
`messaging.operation.name`, `messaging.destination.name` (the queue), `messaging.message.id`
(the job id), `messaging.batch.message_count` (a batch), `jobq.kind`, `jobq.attempt`,
`error.type` on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Iterator, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(
        "jobq.otel needs OpenTelemetry: pip install 'jobq[otel]' (or unset JOBQ_OTEL)"
    ) from exc

from jobq import middleware
from jobq.middleware import CallNext, EnqueueNext, EnqueueNextSync, Middleware
from jobq.queue.validation import MAX_TRACE_CONTEXT_BYTES
from jobq.registry import JobCancelled, Snooze

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from jobq.queue.model import NewJob
    from jobq.registry import JobContext

SYSTEM = "jobq"

_log = logging.getLogger("jobq.otel")


def _version() -> str:
    try:
        return version("jobq")
    except PackageNotFoundError:  # pragma: no cover
        return "0"


class OpenTelemetry(Middleware):
    """Spans around enqueues and runs (see the module docstring). `tracer_provider`: the
    global one unless given."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer(
            "jobq", _version(), tracer_provider=tracer_provider,
            schema_url="https://opentelemetry.io/schemas/1.27.0",
        )  # fmt: skip

    async def enqueue(self, jobs: list[NewJob], call_next: EnqueueNext) -> list[uuid.UUID]:
        with self._send_span(jobs) as (span, carrying):
            try:
                ids = await call_next(carrying)
            except Exception as exc:
                _failed(span, exc)
                raise
            _sent(span, ids)
            return ids

    def enqueue_sync(self, jobs: list[NewJob], call_next: EnqueueNextSync) -> list[uuid.UUID]:
        with self._send_span(jobs) as (span, carrying):
            try:
                ids = call_next(carrying)
            except Exception as exc:
                _failed(span, exc)
                raise
            _sent(span, ids)
            return ids

    @contextlib.contextmanager
    def _send_span(self, jobs: list[NewJob]) -> Iterator[tuple[trace.Span, list[NewJob]]]:
        """The PRODUCER span of an enqueue, current; and the jobs carrying its context."""
        queues = {j.queue for j in jobs}
        queue = next(iter(queues)) if len(queues) == 1 else None
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
        }
        if queue is not None:
            attributes["messaging.destination.name"] = queue
        if len(jobs) == 1:
            attributes["jobq.kind"] = jobs[0].kind
        else:
            attributes["messaging.batch.message_count"] = len(jobs)
        with self.tracer.start_as_current_span(
            f"send {queue}" if queue is not None else "send",
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            carrier = trace_context()
            if carrier:
                jobs = [dataclasses.replace(j, trace_context=carrier) for j in jobs]
            yield span, jobs

    async def run(self, ctx: JobContext, call_next: CallNext) -> Any:
        links = []
        if ctx.trace_context:
            enqueued = trace.get_current_span(propagate.extract(ctx.trace_context))
            if enqueued.get_span_context().is_valid:
                links.append(Link(enqueued.get_span_context()))
        with self.tracer.start_as_current_span(
            f"process {ctx.queue}",
            # A root: the run is its own trace, linked to the enqueue, not a child of whatever
            # the worker's loop had as context.
            context=otel_context.Context(),
            kind=SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": ctx.queue,
                "messaging.message.id": str(ctx.id),
                "jobq.kind": ctx.kind,
                "jobq.attempt": ctx.attempt,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await call_next()
            except JobCancelled:
                span.set_attribute("jobq.cancelled", True)  # on request: not an error
                raise
            except Snooze as snooze:
                span.set_attribute("jobq.snooze_seconds", snooze.seconds)  # nor is a snooze
                raise
            except Exception as exc:
                _failed(span, exc)
                raise


def _sent(span: trace.Span, ids: list[uuid.UUID]) -> None:
    if len(ids) == 1:
        span.set_attribute("messaging.message.id", str(ids[0]))


def _failed(span: trace.Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))


def trace_context() -> dict[str, str]:
    """The current context as the configured propagator writes it (W3C `traceparent` and
    `tracestate` by default), bounded: beyond MAX_TRACE_CONTEXT_BYTES only `traceparent` is
    kept, so a caller's large `tracestate` or baggage cannot bloat every job."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if sum(len(k) + len(v) for k, v in carrier.items()) > MAX_TRACE_CONTEXT_BYTES:
        carrier = {k: v for k, v in carrier.items() if k == "traceparent"}
    return carrier


class RequestContext:
    """ASGI: a request's `traceparent`/`tracestate` headers become the current context, so an
    enqueue span is a child of the caller's span; unless a span is current already (the app
    is instrumented by opentelemetry-instrumentation-asgi or -fastapi, which did that)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or trace.get_current_span().get_span_context().is_valid:
            await self.app(scope, receive, send)
            return
        headers = _Headers(scope["headers"])
        token = otel_context.attach(propagate.extract(headers))
        try:
            await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)


class _Headers(Mapping[str, str]):
    """ASGI headers as a carrier the propagator reads (lower-case names, first value)."""

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def __getitem__(self, name: str) -> str:
        wanted = name.lower().encode("latin-1")
        for key, value in self._raw:
            if key == wanted:
                return value.decode("latin-1")
        raise KeyError(name)

    def __iter__(self) -> Any:
        return iter(dict.fromkeys(k.decode("latin-1") for k, _ in self._raw))

    def __len__(self) -> int:
        return len(set(k for k, _ in self._raw))


_instrumented: OpenTelemetry | None = None


def instrument(tracer_provider: trace.TracerProvider | None = None) -> OpenTelemetry:
    """Turn OpenTelemetry on in this process: spans for every enqueue and every run of a
    worker started from now on. Again later, it returns the middleware already installed."""
    global _instrumented
    if _instrumented is None:
        if tracer_provider is None and isinstance(
            trace.get_tracer_provider(), trace.ProxyTracerProvider
        ):
            # jobq sets up no SDK of its own: without one, every span would go nowhere.
            _log.warning(
                "OpenTelemetry is on but no tracer provider is set yet: spans are dropped"
                " until one is (set up opentelemetry-sdk and an exporter in this process,"
                " or run it under opentelemetry-instrument)"
            )
        _instrumented = OpenTelemetry(tracer_provider)
        middleware.install(_instrumented)
    return _instrumented


def uninstrument() -> None:
    """Turn it off for what starts from now on (running workers keep their chain)."""
    global _instrumented
    if _instrumented is not None:
        middleware.uninstall(_instrumented)
        _instrumented = None


def instrumented() -> bool:
    return _instrumented is not None
