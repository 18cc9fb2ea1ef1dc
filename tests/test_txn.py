"""Enqueue in the caller's transaction (jobq.txn) on every driver it accepts, against the real
database: the job exists only once the caller commits; a rollback, or a rollback to a savepoint,
leaves nothing; idempotency keys behave as in Queue.enqueue; the commit wakes a worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
import sqlalchemy.orm
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, create_async_engine

from jobq import Middleware, middleware, txn
from jobq.examples import registry as examples
from jobq.middleware import EnqueueNext
from jobq.queue import NEW_JOB_CHANNEL, IdempotencyConflict, InvalidJob, NewJob, Queue
from jobq.settings import Settings
from jobq.worker import Worker, listener
from tests.helpers import ALL_JOBS, wait_for

# -- drivers: each opens a transaction, enqueues in it, and ends it ------------------------


class AsyncDriver:
    """One connection of an async driver, with its transaction controls."""

    name: str

    async def open(self, dsn: str) -> None: ...
    async def close(self) -> None: ...
    async def savepoint(self) -> None: ...
    async def rollback_to_savepoint(self) -> None: ...
    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...

    conn: Any


class Asyncpg(AsyncDriver):
    name = "asyncpg"

    async def open(self, dsn: str) -> None:
        self.conn = await asyncpg.connect(dsn)  # no jobq codecs: a plain application connection
        self.tx = self.conn.transaction()
        await self.tx.start()

    async def close(self) -> None:
        await self.conn.close()

    async def savepoint(self) -> None:
        self.sp = self.conn.transaction()
        await self.sp.start()

    async def rollback_to_savepoint(self) -> None:
        await self.sp.rollback()

    async def commit(self) -> None:
        await self.tx.commit()

    async def rollback(self) -> None:
        await self.tx.rollback()


class PsycopgAsync(AsyncDriver):
    name = "psycopg-async"

    async def open(self, dsn: str) -> None:
        self.conn = await psycopg.AsyncConnection.connect(dsn)  # a transaction on first use

    async def close(self) -> None:
        await self.conn.close()

    async def savepoint(self) -> None:
        await self.conn.execute("SAVEPOINT s")

    async def rollback_to_savepoint(self) -> None:
        await self.conn.execute("ROLLBACK TO SAVEPOINT s")

    async def commit(self) -> None:
        await self.conn.commit()

    async def rollback(self) -> None:
        await self.conn.rollback()


class SqlAlchemyAsyncSession(AsyncDriver):
    name = "sqlalchemy-asyncsession-asyncpg"

    async def open(self, dsn: str) -> None:
        self.engine = create_async_engine(_sa_url(dsn, "asyncpg"), poolclass=sa.pool.NullPool)
        self.conn = AsyncSession(self.engine)

    async def close(self) -> None:
        await self.conn.close()
        await self.engine.dispose()

    async def savepoint(self) -> None:
        self.sp = await self.conn.begin_nested()

    async def rollback_to_savepoint(self) -> None:
        await self.sp.rollback()

    async def commit(self) -> None:
        await self.conn.commit()

    async def rollback(self) -> None:
        await self.conn.rollback()


class SqlAlchemyAsyncConnection(AsyncDriver):
    name = "sqlalchemy-asyncconnection-psycopg"

    async def open(self, dsn: str) -> None:
        self.engine = create_async_engine(_sa_url(dsn, "psycopg"), poolclass=sa.pool.NullPool)
        self.conn: AsyncConnection = await self.engine.connect()

    async def close(self) -> None:
        await self.conn.close()
        await self.engine.dispose()

    async def savepoint(self) -> None:
        self.sp = await self.conn.begin_nested()

    async def rollback_to_savepoint(self) -> None:
        await self.sp.rollback()

    async def commit(self) -> None:
        await self.conn.commit()

    async def rollback(self) -> None:
        await self.conn.rollback()


class SyncDriver:
    name: str
    conn: Any

    def open(self, dsn: str) -> None: ...
    def close(self) -> None: ...
    def savepoint(self) -> None: ...
    def rollback_to_savepoint(self) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...


class Psycopg(SyncDriver):
    name = "psycopg"

    def open(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn)

    def close(self) -> None:
        self.conn.close()

    def savepoint(self) -> None:
        self.conn.execute("SAVEPOINT s")

    def rollback_to_savepoint(self) -> None:
        self.conn.execute("ROLLBACK TO SAVEPOINT s")

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()


class SqlAlchemySession(SyncDriver):
    name = "sqlalchemy-session-psycopg"

    def open(self, dsn: str) -> None:
        self.engine = sa.create_engine(_sa_url(dsn, "psycopg"), poolclass=sa.pool.NullPool)
        self.conn = sqlalchemy.orm.Session(self.engine)

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()

    def savepoint(self) -> None:
        self.sp = self.conn.begin_nested()

    def rollback_to_savepoint(self) -> None:
        self.sp.rollback()

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()


class SqlAlchemyConnection(SqlAlchemySession):
    name = "sqlalchemy-connection-psycopg"

    def open(self, dsn: str) -> None:
        self.engine = sa.create_engine(_sa_url(dsn, "psycopg"), poolclass=sa.pool.NullPool)
        self.conn = self.engine.connect()


class Django(SyncDriver):
    """Django's own connection, configured with settings.configure() for the test database."""

    name = "django"

    def open(self, dsn: str) -> None:
        import django
        from django.conf import settings

        parts = urlsplit(dsn)
        # The embedded server is reached through a Unix socket given as ?host=…&port=….
        query = dict(parse_qsl(parts.query))
        database = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parts.path.lstrip("/"),
            "USER": parts.username or "",
            "PASSWORD": parts.password or "",
            "HOST": query.get("host") or parts.hostname or "",
            "PORT": str(query.get("port") or parts.port or 5432),
        }
        if not settings.configured:
            settings.configure(DATABASES={"default": database}, USE_TZ=True, INSTALLED_APPS=[])
            django.setup()
        from django.db import connection, transaction

        assert connection.settings_dict["NAME"] == database["NAME"]
        self.transaction = transaction
        self.conn = connection
        self.atomic = transaction.atomic()
        self.atomic.__enter__()

    def close(self) -> None:
        self.conn.close()

    def savepoint(self) -> None:
        self.sp = self.transaction.savepoint()

    def rollback_to_savepoint(self) -> None:
        self.transaction.savepoint_rollback(self.sp)

    def commit(self) -> None:
        self.atomic.__exit__(None, None, None)

    def rollback(self) -> None:
        self.transaction.set_rollback(True)
        self.atomic.__exit__(None, None, None)


def _sa_url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


ASYNC_DRIVERS = [Asyncpg, PsycopgAsync, SqlAlchemyAsyncSession, SqlAlchemyAsyncConnection]
SYNC_DRIVERS = [Psycopg, SqlAlchemySession, SqlAlchemyConnection, Django]


@pytest.fixture(params=ASYNC_DRIVERS, ids=lambda d: d.name)
async def adriver(request: pytest.FixtureRequest, dsn: str, queue: Queue) -> AsyncIterator[Any]:
    driver = request.param()
    await driver.open(dsn)
    try:
        yield driver
    finally:
        with contextlib.suppress(Exception):
            await driver.rollback()
        await driver.close()


@pytest.fixture(params=SYNC_DRIVERS, ids=lambda d: d.name)
def sdriver(request: pytest.FixtureRequest, dsn: str, queue: Queue) -> Iterator[Any]:
    driver = request.param()
    driver.open(dsn)
    try:
        yield driver
    finally:
        with contextlib.suppress(Exception):
            driver.rollback()
        driver.close()


def count_jobs(dsn: str) -> int:
    """Jobs any other session sees (committed ones), read on a connection of its own."""
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(f"SELECT count(*) FROM {ALL_JOBS}").fetchone()
        assert row is not None
        return int(row[0])


# -- async drivers -------------------------------------------------------------------------


async def test_job_exists_only_once_the_transaction_commits(adriver: Any, dsn: str) -> None:
    result = await txn.enqueue(adriver.conn, NewJob("echo", {"n": 1}))
    assert result.created and result.job.status == "queued" and result.job.payload == {"n": 1}
    assert count_jobs(dsn) == 0
    await adriver.commit()
    assert count_jobs(dsn) == 1


async def test_rollback_leaves_no_job(adriver: Any, dsn: str) -> None:
    await txn.enqueue(adriver.conn, NewJob("echo"))
    await txn.enqueue_many(adriver.conn, [NewJob("echo"), NewJob("echo", idempotency_key="k")])
    await adriver.rollback()
    assert count_jobs(dsn) == 0


async def test_rollback_to_a_savepoint_leaves_no_job(adriver: Any, dsn: str) -> None:
    await txn.enqueue(adriver.conn, NewJob("echo", {"kept": True}))
    await adriver.savepoint()
    await txn.enqueue(adriver.conn, NewJob("echo", {"kept": False}, idempotency_key="sp"))
    await adriver.rollback_to_savepoint()
    await adriver.commit()
    with psycopg.connect(dsn) as c:
        rows = c.execute("SELECT payload FROM jobs").fetchall()
        keys = c.execute("SELECT count(*) FROM jobq_idempotency_keys").fetchone()
    assert [r[0] for r in rows] == [{"kept": True}]
    assert keys == (0,)


async def test_idempotent_replay_in_the_transaction_returns_the_same_job(
    adriver: Any, dsn: str
) -> None:
    first = await txn.enqueue(adriver.conn, NewJob("echo", {"a": 1}, idempotency_key="order-7"))
    again = await txn.enqueue(adriver.conn, NewJob("echo", {"a": 1}, idempotency_key="order-7"))
    assert first.created and not again.created and again.job.id == first.job.id
    with pytest.raises(IdempotencyConflict):
        await txn.enqueue(adriver.conn, NewJob("echo", {"a": 2}, idempotency_key="order-7"))


async def test_enqueue_many_returns_ids_in_order_and_commits_with_the_caller(
    adriver: Any, dsn: str
) -> None:
    stored = await txn.enqueue_many(
        adriver.conn, [NewJob("echo", {"i": i % 2}, idempotency_key=f"m{i % 2}") for i in range(4)]
    )
    assert [s.created for s in stored] == [True, True, False, False]
    assert stored[0].id == stored[2].id and stored[1].id == stored[3].id
    await adriver.commit()
    assert count_jobs(dsn) == 2


# -- sync drivers --------------------------------------------------------------------------


def test_sync_job_exists_only_once_the_transaction_commits(sdriver: Any, dsn: str) -> None:
    result = txn.enqueue_sync(sdriver.conn, NewJob("echo", {"n": 1}))
    assert result.created and result.job.payload == {"n": 1}
    assert result.job.created_at.tzinfo is not None
    assert count_jobs(dsn) == 0
    sdriver.commit()
    assert count_jobs(dsn) == 1


def test_sync_rollback_leaves_no_job(sdriver: Any, dsn: str) -> None:
    txn.enqueue_sync(sdriver.conn, NewJob("echo"))
    txn.enqueue_many_sync(sdriver.conn, [NewJob("echo"), NewJob("echo", idempotency_key="k")])
    sdriver.rollback()
    assert count_jobs(dsn) == 0


def test_sync_rollback_to_a_savepoint_leaves_no_job(sdriver: Any, dsn: str) -> None:
    txn.enqueue_sync(sdriver.conn, NewJob("echo", {"kept": True}))
    sdriver.savepoint()
    txn.enqueue_sync(sdriver.conn, NewJob("echo", {"kept": False}, idempotency_key="sp"))
    sdriver.rollback_to_savepoint()
    sdriver.commit()
    with psycopg.connect(dsn) as c:
        rows = c.execute("SELECT payload FROM jobs").fetchall()
        keys = c.execute("SELECT count(*) FROM jobq_idempotency_keys").fetchone()
    assert [r[0] for r in rows] == [{"kept": True}]
    assert keys == (0,)


def test_sync_idempotent_replay_in_the_transaction_returns_the_same_job(
    sdriver: Any, dsn: str
) -> None:
    first = txn.enqueue_sync(sdriver.conn, NewJob("echo", {"a": 1}, idempotency_key="order-7"))
    again = txn.enqueue_sync(sdriver.conn, NewJob("echo", {"a": 1}, idempotency_key="order-7"))
    assert first.created and not again.created and again.job.id == first.job.id
    with pytest.raises(IdempotencyConflict):
        txn.enqueue_sync(sdriver.conn, NewJob("echo", {"a": 2}, idempotency_key="order-7"))


def test_sync_enqueue_many_returns_ids_in_order(sdriver: Any, dsn: str) -> None:
    stored = txn.enqueue_many_sync(
        sdriver.conn, [NewJob("echo", {"i": i % 2}, idempotency_key=f"m{i % 2}") for i in range(4)]
    )
    assert [s.created for s in stored] == [True, True, False, False]
    sdriver.commit()
    assert count_jobs(dsn) == 2


# -- the process-wide enqueue middleware in the sync forms ----------------------------------


class TagPayload(Middleware):
    """Adds which hook ran to every payload: what a middleware hands on is stored."""

    async def enqueue(self, jobs: list[NewJob], call_next: EnqueueNext) -> list[uuid.UUID]:
        return await call_next(
            [dataclasses.replace(j, payload={**j.payload, "by": "async"}) for j in jobs]
        )

    def enqueue_sync(self, jobs: list[NewJob], call_next: Any) -> list[uuid.UUID]:
        ids: list[uuid.UUID] = call_next(
            [dataclasses.replace(j, payload={**j.payload, "by": "sync"}) for j in jobs]
        )
        return ids


class AsyncOnly(Middleware):
    async def enqueue(self, jobs: list[NewJob], call_next: EnqueueNext) -> list[uuid.UUID]:
        return await call_next(jobs)


@pytest.fixture
def installed() -> Iterator[Callable[[Middleware], None]]:
    """Installs middleware process-wide for one test."""
    added: list[Middleware] = []

    def install(mw: Middleware) -> None:
        middleware.install(mw)
        added.append(mw)

    yield install
    for mw in added:
        middleware.uninstall(mw)


def test_a_sync_enqueue_goes_through_the_enqueue_sync_hook_of_installed_middleware(
    queue: Queue, dsn: str, installed: Callable[[Middleware], None]
) -> None:
    installed(TagPayload())
    with psycopg.connect(dsn) as conn:
        stored = txn.enqueue_sync(conn, NewJob("echo", {"n": 1}))
    assert stored.job.payload == {"n": 1, "by": "sync"}


def test_a_sync_enqueue_many_goes_through_the_enqueue_sync_hook_of_installed_middleware(
    queue: Queue, dsn: str, installed: Callable[[Middleware], None]
) -> None:
    installed(TagPayload())
    with psycopg.connect(dsn) as conn:
        txn.enqueue_many_sync(conn, [NewJob("echo", {"n": 1}), NewJob("echo", {"n": 2})])
        rows = conn.execute("SELECT payload FROM jobs ORDER BY id").fetchall()
    assert [r[0] for r in rows] == [{"n": 1, "by": "sync"}, {"n": 2, "by": "sync"}]


def test_a_sync_enqueue_refuses_installed_middleware_with_only_an_async_hook_and_stores_nothing(
    queue: Queue, dsn: str, installed: Callable[[Middleware], None]
) -> None:
    installed(AsyncOnly())
    with psycopg.connect(dsn) as conn:
        for enqueue in (lambda: txn.enqueue_sync(conn, NewJob("echo")),
                        lambda: txn.enqueue_many_sync(conn, [NewJob("echo")])):  # fmt: skip
            with pytest.raises(TypeError, match=r"AsyncOnly.*no enqueue_sync hook"):
                enqueue()
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the transaction is still usable
    assert count_jobs(dsn) == 0


def test_a_sync_enqueue_runs_the_middleware_it_is_given_such_as_a_registrys(
    queue: Queue, dsn: str
) -> None:
    with psycopg.connect(dsn) as conn:
        one = txn.enqueue_sync(conn, NewJob("echo", {"n": 1}), middleware=[TagPayload()])
        (many,) = txn.enqueue_many_sync(conn, [NewJob("echo", {"n": 2})], middleware=[TagPayload()])
        stored = conn.execute("SELECT payload FROM jobs WHERE id = %s", [many.id]).fetchone()
    assert one.job.payload == {"n": 1, "by": "sync"}
    assert stored == ({"n": 2, "by": "sync"},)


async def test_an_async_enqueue_runs_the_middleware_it_is_given_such_as_a_registrys(
    queue: Queue, dsn: str
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            one = await txn.enqueue(conn, NewJob("echo", {"n": 1}), middleware=[TagPayload()])
            (many,) = await txn.enqueue_many(
                conn, [NewJob("echo", {"n": 2})], middleware=[TagPayload()]
            )
    finally:
        await conn.close()
    assert one.job.payload == {"n": 1, "by": "async"}
    assert (await queue.get(many.id)).payload == {"n": 2, "by": "async"}


# -- what holds whatever the driver --------------------------------------------------------


async def test_a_key_stored_before_the_transaction_replays_its_job(queue: Queue, dsn: str) -> None:
    before = await queue.enqueue(NewJob("echo", {"a": 1}, idempotency_key="stored"))
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            again = await txn.enqueue(conn, NewJob("echo", {"a": 1}, idempotency_key="stored"))
    finally:
        await conn.close()
    assert not again.created and again.job == before.job


async def test_an_invalid_job_is_refused_before_any_statement(queue: Queue, dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            with pytest.raises(InvalidJob, match="priority"):
                await txn.enqueue_many(conn, [NewJob("echo"), NewJob("echo", priority=10**6)])
            assert await conn.fetchval("SELECT 1") == 1  # the transaction is still usable
    finally:
        await conn.close()


async def test_a_sync_connection_given_to_the_async_form_is_a_type_error(dsn: str) -> None:
    with psycopg.connect(dsn) as conn, pytest.raises(TypeError, match="enqueue_sync"):
        await txn.enqueue(conn, NewJob("echo"))
    with pytest.raises(TypeError, match="psycopg"):
        txn.enqueue_sync(object(), NewJob("echo"))


async def test_the_notify_is_delivered_at_commit_and_not_before(queue: Queue, dsn: str) -> None:
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(dsn)
    await listener.add_listener(NEW_JOB_CHANNEL, lambda *a: heard.put_nowait(a[3]))
    conn = await psycopg.AsyncConnection.connect(dsn)
    try:
        await txn.enqueue(conn, NewJob("echo", queue="mail"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(heard.get(), 0.3)
            raise AssertionError("notified before the commit")
        await conn.commit()
        assert await asyncio.wait_for(heard.get(), 5) == "mail"
    finally:
        await conn.close()
        await listener.close()


async def test_a_listening_worker_runs_the_job_when_the_transaction_commits(
    queue: Queue, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Polling is off in effect: only the NOTIFY that rides on the commit can wake the worker.
    # Its LISTEN self-check gets time enough on a busy machine (else it would poll only).
    monkeypatch.setattr(listener, "LISTEN_CHECK_SECONDS", 20.0)
    settings = Settings(poll_interval_seconds=300, rescue_interval_seconds=300)
    worker = Worker(dsn, examples, settings=settings, concurrency=2)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.wait_started(), 10)
        await asyncio.sleep(0)  # let the listener subscribe before the commit
        conn = await asyncpg.connect(dsn)
        try:
            # Past its self-check: the check channel is left once the NOTIFY came back.
            await wait_for(
                lambda: conn.fetchval(
                    "SELECT count(*) > 0 FROM pg_stat_activity"
                    " WHERE query LIKE 'UNLISTEN%jobq_listen_check%'"
                ),
                timeout=30,
            )
            async with conn.transaction():
                job_id: uuid.UUID = (await txn.enqueue(conn, NewJob("echo", {"x": 1}))).job.id
        finally:
            await conn.close()

        async def done() -> bool:
            return (await queue.get(job_id)).status == "succeeded"

        await wait_for(done, timeout=30)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
