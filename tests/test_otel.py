"""OpenTelemetry (jobq.otel): spans for enqueues and runs, linked through the trace context
stored on the job, read from the SDK's in-memory exporter; a real worker and PostgreSQL."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import jobq.txn
from jobq import otel
from jobq.api import create_app
from jobq.queue import InvalidJob, NewJob, Queue
from jobq.registry import JobContext, Registry, Snooze
from jobq.settings import Settings
from tests.test_worker import FAST, enqueue, finished, running

PROVIDER = TracerProvider()
EXPORTER = InMemorySpanExporter()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
TRACER = PROVIDER.get_tracer("tests")
NAPPED: set[Any] = set()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    otel.instrument(tracer_provider=PROVIDER)
    EXPORTER.clear()
    try:
        yield EXPORTER
    finally:
        otel.uninstrument()
        EXPORTER.clear()


def traceparent(span: ReadableSpan) -> str:
    """The W3C traceparent naming `span`, without its flags."""
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}"


def only(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in spans.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in spans.get_finished_spans()]
    return found[0]


def registry() -> Registry:
    r = Registry()

    @r.handler("ok")
    async def ok(ctx: JobContext, payload: dict[str, Any]) -> None:
        with TRACER.start_as_current_span("inside the handler"):
            pass

    @r.handler("sync_ok")
    def sync_ok(ctx: JobContext, payload: dict[str, Any]) -> None:
        with TRACER.start_as_current_span("inside the sync handler"):
            pass

    @r.handler("nap")
    async def nap(ctx: JobContext, payload: dict[str, Any]) -> None:
        if ctx.id not in NAPPED:  # a snooze gives the attempt back: once, by id
            NAPPED.add(ctx.id)
            raise Snooze(0)

    @r.handler("boom", max_attempts=1)
    async def boom(ctx: JobContext, payload: dict[str, Any]) -> None:
        raise ValueError("no luck")

    return r


async def stored_trace_context(pool: asyncpg.Pool, job_id: Any) -> Any:
    return await pool.fetchval(
        "SELECT trace_context FROM jobs WHERE id = $1"
        " UNION ALL SELECT trace_context FROM jobs_history WHERE id = $1",
        job_id,
    )


# -- enqueue -------------------------------------------------------------------------------


async def test_an_enqueue_is_a_producer_span_with_the_messaging_attributes(
    queue: Queue, spans: InMemorySpanExporter
) -> None:
    job = (await queue.enqueue(NewJob("ok", queue="mail"))).job
    span = only(spans, "send mail")
    assert span.kind is SpanKind.PRODUCER
    assert dict(span.attributes or {}) == {
        "messaging.system": "jobq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "mail",
        "messaging.message.id": str(job.id),
        "jobq.kind": "ok",
    }


async def test_the_enqueue_spans_context_is_stored_on_the_job(
    queue: Queue, pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    with TRACER.start_as_current_span("request") as request:
        job = await enqueue(queue, "ok")
    send = only(spans, "send default")
    assert send.parent is not None and send.parent.span_id == request.get_span_context().span_id
    stored = await stored_trace_context(pool, job.id)
    assert stored["traceparent"][:-3] == traceparent(send)


async def test_a_unique_job_stores_the_enqueue_spans_context(
    queue: Queue, pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    job = (await queue.enqueue(NewJob("ok"), unique_for=timedelta(minutes=1))).job
    stored = await stored_trace_context(pool, job.id)
    assert stored["traceparent"][:-3] == traceparent(only(spans, "send default"))


async def test_a_retried_job_keeps_the_trace_context_of_its_enqueue(
    queue: Queue, pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    job = (await queue.enqueue(NewJob("ok"))).job
    await queue.request_cancel(job.id)
    await queue.retry(job.id)
    stored = await stored_trace_context(pool, job.id)
    assert stored["traceparent"][:-3] == traceparent(only(spans, "send default"))


async def test_a_batch_is_one_span_and_every_job_carries_its_context(
    queue: Queue, pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    ids = await queue.enqueue_many([NewJob("ok"), NewJob("ok"), NewJob("ok")])
    send = only(spans, "send default")
    assert (send.attributes or {})["messaging.batch.message_count"] == 3
    stored = {(await stored_trace_context(pool, i))["traceparent"][:-3] for i in ids}
    assert stored == {traceparent(send)}


async def test_an_enqueue_in_the_callers_transaction_is_a_span_too(
    queue: Queue, pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        stored = await jobq.txn.enqueue(conn, NewJob("ok"))
    send = only(spans, "send default")
    assert (send.attributes or {})["messaging.message.id"] == str(stored.job.id)
    assert (await stored_trace_context(pool, stored.job.id))["traceparent"][:-3] == traceparent(
        send
    )


def test_a_sync_enqueue_in_the_callers_transaction_is_a_span_too(
    queue: Queue, dsn: str, spans: InMemorySpanExporter
) -> None:
    with psycopg.connect(dsn) as conn:
        stored = jobq.txn.enqueue_sync(conn, NewJob("ok", queue="mail"))
        row = conn.execute("SELECT trace_context FROM jobs WHERE id = %s", [stored.job.id])
        stored_context = row.fetchone()[0]  # type: ignore[index]
    send = only(spans, "send mail")
    assert (send.attributes or {})["messaging.message.id"] == str(stored.job.id)
    assert stored_context["traceparent"][:-3] == traceparent(send)


async def test_a_failed_enqueue_has_error_status(queue: Queue, spans: InMemorySpanExporter) -> None:
    with pytest.raises(InvalidJob):
        await queue.enqueue(NewJob("ok", priority=1 << 20))
    send = only(spans, "send default")
    assert send.status.status_code is StatusCode.ERROR
    assert (send.attributes or {})["error.type"] == "InvalidJob"


async def test_an_enqueue_over_http_is_a_child_of_the_requests_traceparent(
    queue: Queue, pool: asyncpg.Pool, spans: InMemorySpanExporter
) -> None:
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    app = create_app(Settings(), pool=pool)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/jobs", json={"kind": "ok"}, headers={"traceparent": caller})
    assert response.status_code == 201
    send = only(spans, "send default")
    assert f"{send.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert send.parent is not None and f"{send.parent.span_id:016x}" == "b7ad6b7169203331"


# -- run -----------------------------------------------------------------------------------


async def test_a_run_is_a_consumer_span_linked_to_the_enqueue(
    queue: Queue, dsn: str, spans: InMemorySpanExporter
) -> None:
    job = await enqueue(queue, "ok")
    async with running(dsn, registry()):
        await finished(queue, job.id)
    send, process = only(spans, "send default"), only(spans, "process default")
    assert (process.kind, process.parent) == (SpanKind.CONSUMER, None)
    assert [link.context.span_id for link in process.links] == [send.context.span_id]
    assert dict(process.attributes or {}) == {
        "messaging.system": "jobq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "default",
        "messaging.message.id": str(job.id),
        "jobq.kind": "ok",
        "jobq.attempt": 1,
    }
    assert process.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize("kind", ["ok", "sync_ok"])
async def test_spans_made_in_a_handler_are_children_of_its_run(
    queue: Queue, dsn: str, spans: InMemorySpanExporter, kind: str
) -> None:
    job = await enqueue(queue, kind)
    async with running(dsn, registry()):
        await finished(queue, job.id)
    process = only(spans, "process default")
    inner = only(spans, "inside the sync handler" if kind == "sync_ok" else "inside the handler")
    assert inner.parent is not None and inner.parent.span_id == process.context.span_id


async def test_a_failed_run_has_error_status_and_the_exception(
    queue: Queue, dsn: str, spans: InMemorySpanExporter
) -> None:
    job = await enqueue(queue, "boom")
    async with running(dsn, registry()):
        await finished(queue, job.id)
    process = only(spans, "process default")
    assert process.status.status_code is StatusCode.ERROR
    assert (process.attributes or {})["error.type"] == "ValueError"
    assert [e.name for e in process.events] == ["exception"]


async def test_a_snoozed_run_is_not_an_error(
    queue: Queue, dsn: str, spans: InMemorySpanExporter
) -> None:
    job = await enqueue(queue, "nap")
    async with running(dsn, registry()):
        await finished(queue, job.id)
    first, *_ = sorted(
        (s for s in spans.get_finished_spans() if s.name == "process default"),
        key=lambda s: s.start_time or 0,
    )
    assert first.status.status_code is StatusCode.UNSET
    assert (first.attributes or {})["jobq.snooze_seconds"] == 0


async def test_the_trace_context_goes_to_history_with_the_job(
    queue: Queue, pool: asyncpg.Pool, dsn: str, spans: InMemorySpanExporter
) -> None:
    job = await enqueue(queue, "ok")
    async with running(dsn, registry()):
        await finished(queue, job.id)
    moved = await pool.fetchval("SELECT trace_context FROM jobs_history WHERE id = $1", job.id)
    assert moved is not None and "traceparent" in moved


# -- off, and turning it on ----------------------------------------------------------------


async def test_off_there_is_no_span_and_no_trace_context(
    queue: Queue, pool: asyncpg.Pool, dsn: str
) -> None:
    EXPORTER.clear()
    assert not otel.instrumented()
    job = await enqueue(queue, "ok")
    async with running(dsn, registry()):
        await finished(queue, job.id)
    assert [s.name for s in EXPORTER.get_finished_spans()] == ["inside the handler"]
    assert await stored_trace_context(pool, job.id) is None


def test_turning_it_on_without_a_tracer_provider_says_spans_are_dropped() -> None:
    # In a process of its own: this one has the SDK's provider set.
    script = "import logging; logging.basicConfig(); import jobq.otel; jobq.otel.instrument()"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "no tracer provider is set" in done.stderr


async def test_jobq_otel_setting_turns_it_on_for_a_worker(queue: Queue, dsn: str) -> None:
    try:
        async with running(dsn, registry(), settings=dataclasses.replace(FAST, otel=True)):
            assert otel.instrumented()
    finally:
        otel.uninstrument()


async def test_a_trace_context_that_is_too_large_is_refused(queue: Queue) -> None:
    with pytest.raises(InvalidJob, match="trace_context"):
        await queue.enqueue(NewJob("ok", trace_context={"tracestate": "x" * 5000}))
