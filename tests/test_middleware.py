"""Middleware around runs and enqueues, with a real worker and a real PostgreSQL."""

from __future__ import annotations

import contextvars
import dataclasses
import importlib.util
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from jobq import Middleware, middleware
from jobq.api import create_app
from jobq.middleware import CallNext, EnqueueNext
from jobq.queue import NewJob, Queue
from jobq.registry import JobContext, Registry
from jobq.settings import Settings
from tests.helpers import ROOT
from tests.test_worker import enqueue, finished, running


class Recorder(Middleware):
    """Records what it wraps, in `events`, under its name."""

    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events

    async def run(self, ctx: JobContext, call_next: CallNext) -> Any:
        self.events.append(f"{self.name} before {ctx.kind}")
        try:
            result = await call_next()
        except Exception as exc:
            self.events.append(f"{self.name} error {type(exc).__name__}")
            raise
        self.events.append(f"{self.name} after {result!r}")
        return result

    async def enqueue(self, jobs: list[NewJob], call_next: EnqueueNext) -> list[uuid.UUID]:
        self.events.append(f"{self.name} enqueue {[j.kind for j in jobs]}")
        ids = await call_next(jobs)
        self.events.append(f"{self.name} enqueued {len(ids)}")
        return ids


@pytest.fixture
def no_installed() -> Iterator[None]:
    """Leaves the process-wide middleware as the test found it."""
    before = middleware.installed()
    yield
    for mw in middleware.installed():
        if mw not in before:
            middleware.uninstall(mw)


def registry_with(*mws: Any) -> Registry:
    registry = Registry(middleware=mws)

    @registry.handler("ok")
    async def ok(ctx: JobContext, payload: dict[str, Any]) -> Any:
        return payload.get("value", "done")

    @registry.handler("boom", max_attempts=1)
    async def boom(ctx: JobContext, payload: dict[str, Any]) -> None:
        raise ValueError("handler failed")

    return registry


# -- around runs ---------------------------------------------------------------------------


async def test_run_middleware_wraps_each_run_first_registered_outermost(
    queue: Queue, dsn: str
) -> None:
    events: list[str] = []
    registry = registry_with(Recorder("outer", events), Recorder("inner", events))
    job = await enqueue(queue, "ok")
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert done.status == "succeeded"
    assert events == ["outer before ok", "inner before ok", "inner after 'done'",
                      "outer after 'done'"]  # fmt: skip


async def test_run_middleware_sees_the_handlers_exception_and_the_job_fails_as_usual(
    queue: Queue, dsn: str
) -> None:
    events: list[str] = []
    job = await enqueue(queue, "boom")
    async with running(dsn, registry_with(Recorder("m", events))):
        done = await finished(queue, job.id)
    assert events == ["m before boom", "m error ValueError"]
    assert (done.status, done.last_error) == ("failed_permanent", "ValueError: handler failed")


async def test_a_middleware_that_raises_before_the_handler_fails_the_attempt_and_it_is_retried(
    queue: Queue, dsn: str
) -> None:
    ran: list[int] = []
    registry = Registry()

    @registry.use
    async def flaky_setup(ctx: JobContext, call_next: CallNext) -> Any:
        if ctx.attempt == 1:
            raise ConnectionError("session pool unavailable")
        return await call_next()

    @registry.handler("count", max_attempts=3)
    async def count(ctx: JobContext, payload: dict[str, Any]) -> int:
        ran.append(ctx.attempt)
        return ctx.attempt

    job = await enqueue(queue, "count")
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert (done.status, done.attempts, done.result, ran) == ("succeeded", 2, 2, [2])
    assert [e["error"] for e in done.errors] == ["ConnectionError: session pool unavailable"]


async def test_a_middleware_that_raises_after_the_handler_fails_the_attempt_and_frees_the_lease(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()

    @registry.use
    async def failing_commit(ctx: JobContext, call_next: CallNext) -> Any:
        await call_next()
        raise RuntimeError("commit failed")

    @registry.handler("work", max_attempts=1)
    async def work(ctx: JobContext, payload: dict[str, Any]) -> str:
        return "handler result"

    job = await enqueue(queue, "work")
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert (done.status, done.last_error, done.result) == (
        "failed_permanent", "RuntimeError: commit failed", None,
    )  # fmt: skip
    assert done.lease_token is None and done.lease_expires_at is None


async def test_what_a_middleware_returns_is_the_result(queue: Queue, dsn: str) -> None:
    registry = registry_with()

    @registry.use
    async def swallow(ctx: JobContext, call_next: CallNext) -> Any:
        try:
            return await call_next()
        except ValueError as exc:
            return {"recovered": str(exc)}

    job = await enqueue(queue, "boom")
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert (done.status, done.result) == ("succeeded", {"recovered": "handler failed"})


async def test_call_next_twice_raises_so_the_handler_runs_once(queue: Queue, dsn: str) -> None:
    runs: list[int] = []
    registry = Registry()

    @registry.use
    async def twice(ctx: JobContext, call_next: CallNext) -> Any:
        await call_next()
        return await call_next()

    @registry.handler("once", max_attempts=1)
    async def once(ctx: JobContext, payload: dict[str, Any]) -> None:
        runs.append(1)

    job = await enqueue(queue, "once")
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert runs == [1]
    assert done.status == "failed_permanent"
    assert done.last_error is not None and "call_next was already called" in done.last_error


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


async def test_a_sync_handler_sees_the_context_variables_a_middleware_set(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()

    @registry.use
    async def log_context(ctx: JobContext, call_next: CallNext) -> Any:
        token = REQUEST_ID.set(f"job-{ctx.id}")
        try:
            return await call_next()
        finally:
            REQUEST_ID.reset(token)

    @registry.handler("sync")
    def sync(ctx: JobContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"seen": REQUEST_ID.get("unset"), "in_thread": threading.current_thread().name}

    job = await enqueue(queue, "sync")
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert done.result["seen"] == f"job-{job.id}"
    assert done.result["in_thread"].startswith("jobq-handler-")


async def test_an_invalid_payload_passes_through_middleware_and_fails_permanently(
    queue: Queue, dsn: str
) -> None:
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int

    events: list[str] = []
    registry = Registry(middleware=[Recorder("m", events)])

    @registry.handler("point", max_attempts=5)
    async def point(ctx: JobContext, payload: Point) -> int:
        return payload.x

    job = await enqueue(queue, "point", {"x": "not a number"})
    async with running(dsn, registry):
        done = await finished(queue, job.id)
    assert events == ["m before point", "m error PayloadInvalid"]
    assert (done.status, done.attempts) == ("failed_permanent", 1)


def test_registration_refuses_what_cannot_be_a_middleware() -> None:
    registry = Registry()

    def not_async(ctx: JobContext, call_next: CallNext) -> None: ...

    async def one_parameter(ctx: JobContext) -> None: ...

    for bad in (not_async, one_parameter, Recorder, "middleware"):
        with pytest.raises(TypeError):
            registry.use(bad)  # type: ignore[arg-type]
    assert registry.middleware == ()


def test_a_middleware_with_an_enqueue_sync_hook_and_no_async_one_is_refused_when_added(
    pool: asyncpg.Pool, no_installed: None
) -> None:
    class SyncOnly(Middleware):
        def enqueue_sync(self, jobs: list[NewJob], call_next: Any) -> list[uuid.UUID]:
            ids: list[uuid.UUID] = call_next(jobs)
            return ids

    with pytest.raises(TypeError, match="no async enqueue hook"):
        Registry().use(SyncOnly())
    with pytest.raises(TypeError, match="no async enqueue hook"):
        Queue(pool, middleware=[SyncOnly()])
    with pytest.raises(TypeError, match="no async enqueue hook"):
        middleware.install(SyncOnly())
    assert middleware.installed() == ()


# -- around enqueues -----------------------------------------------------------------------


class Tagging(Middleware):
    """Raises every job's priority to 7: what an enqueue middleware hands on is stored."""

    def __init__(self) -> None:
        self.ids: list[uuid.UUID] = []

    async def enqueue(self, jobs: list[NewJob], call_next: EnqueueNext) -> list[uuid.UUID]:
        ids = await call_next([dataclasses.replace(j, priority=7) for j in jobs])
        self.ids += ids
        return ids


async def test_enqueue_middleware_changes_what_is_stored_and_sees_the_ids(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    tagging = Tagging()
    tagged = Queue(pool, middleware=[tagging])
    one = (await tagged.enqueue(NewJob(kind="a"))).job
    many = await tagged.enqueue_many([NewJob(kind="b"), NewJob(kind="c")])
    assert one.priority == 7
    assert tagging.ids == [one.id, *many]
    assert {(await queue.get(i)).priority for i in many} == {7}


async def test_an_enqueue_middleware_that_raises_stores_nothing(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    class Refuse(Middleware):
        async def enqueue(self, jobs: list[NewJob], call_next: EnqueueNext) -> list[uuid.UUID]:
            raise PermissionError("tenant over quota")

    with pytest.raises(PermissionError):
        await Queue(pool, middleware=[Refuse()]).enqueue(NewJob(kind="a"))
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 0


async def test_an_enqueue_middleware_must_call_call_next(queue: Queue, pool: asyncpg.Pool) -> None:
    class Forget(Middleware):
        async def enqueue(self, jobs: list[NewJob], call_next: EnqueueNext) -> list[uuid.UUID]:
            return []

    with pytest.raises(RuntimeError, match="without calling call_next"):
        await Queue(pool, middleware=[Forget()]).enqueue_many([NewJob(kind="a")])
    assert await pool.fetchval("SELECT count(*) FROM jobs") == 0


async def test_an_api_started_with_a_registry_enqueues_through_its_middleware(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    events: list[str] = []
    app = create_app(Settings(), pool=pool, registry=registry_with(Recorder("api", events)))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/jobs", json={"kind": "ok"})
    assert response.status_code == 201
    assert events == ["api enqueue ['ok']", "api enqueued 1"]


async def test_installed_middleware_wraps_every_queue_and_worker_outermost(
    queue: Queue, dsn: str, no_installed: None
) -> None:
    events: list[str] = []
    middleware.install(Recorder("process", events))
    job = await enqueue(queue, "ok")
    async with running(dsn, registry_with(Recorder("registry", events))):
        await finished(queue, job.id)
    assert events[:4] == ["process enqueue ['ok']", "process enqueued 1", "process before ok",
                          "registry before ok"]  # fmt: skip


def test_installing_a_function_twice_installs_it_once(no_installed: None) -> None:
    async def tag(ctx: JobContext, call_next: CallNext) -> Any:
        return await call_next()

    middleware.install(tag)
    middleware.install(tag)
    assert len(middleware.installed()) == 1


def test_a_function_installed_can_be_uninstalled(no_installed: None) -> None:
    async def tag(ctx: JobContext, call_next: CallNext) -> Any:
        return await call_next()

    middleware.install(tag)
    middleware.uninstall(tag)
    assert middleware.installed() == ()


# -- the documented example: a SQLAlchemy session per job -----------------------------------


@pytest.fixture
async def session_example(
    dsn: str, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Any]:
    """docs/examples/sqlalchemy_session.py, loaded against this module's database."""
    pytest.importorskip("sqlalchemy")
    monkeypatch.setenv("APP_DATABASE_URL", dsn.replace("postgresql://", "postgresql+asyncpg://"))
    path = ROOT / "docs" / "examples" / "sqlalchemy_session.py"
    spec = importlib.util.spec_from_file_location("sqlalchemy_session", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    await pool.execute(
        "DROP TABLE IF EXISTS orders;"
        " CREATE TABLE orders (id int PRIMARY KEY, status text NOT NULL);"
        " INSERT INTO orders VALUES (1, 'new'), (2, 'new')"
    )
    try:
        yield example
    finally:
        await example.engine.dispose()


async def test_the_session_example_commits_what_a_handler_wrote_when_it_returns(
    queue: Queue, dsn: str, pool: asyncpg.Pool, session_example: Any
) -> None:
    job = await enqueue(queue, "order.confirm", {"order_id": 1})
    async with running(dsn, session_example.registry):
        done = await finished(queue, job.id)
    assert done.status == "succeeded"
    assert await pool.fetchval("SELECT status FROM orders WHERE id = 1") == "confirmed"


async def test_the_session_example_rolls_back_what_a_failing_handler_wrote(
    queue: Queue, dsn: str, pool: asyncpg.Pool, session_example: Any
) -> None:
    from sqlalchemy import text

    @session_example.registry.handler("order.confirm_then_fail", max_attempts=1)
    async def confirm_then_fail(ctx: JobContext, payload: dict[str, Any]) -> None:
        await session_example.session().execute(
            text("UPDATE orders SET status = 'confirmed' WHERE id = 2")
        )
        raise RuntimeError("payment declined")

    job = await enqueue(queue, "order.confirm_then_fail")
    async with running(dsn, session_example.registry):
        done = await finished(queue, job.id)
    assert (done.status, done.last_error) == ("failed_permanent", "RuntimeError: payment declined")
    assert await pool.fetchval("SELECT status FROM orders WHERE id = 2") == "new"
