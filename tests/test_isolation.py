"""jobq's statements run READ COMMITTED whatever the database's default isolation is."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from jobq import db
from jobq.queue import CancelOutcome, NewJob, Queue, lease_of
from tests.conftest import create_database, drop_database, with_database
from tests.helpers import wait_for

LEVELS = ["repeatable read", "serializable"]


@pytest.fixture(scope="module", params=LEVELS)
async def strict_dsn(
    admin_dsn: str, template_dsn: str, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    """A database whose default_transaction_isolation is stricter than read committed."""
    name = await create_database(admin_dsn, "isolation")
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(
            f"ALTER DATABASE {name} SET default_transaction_isolation = '{request.param}'"
        )
    finally:
        await conn.close()
    try:
        yield with_database(admin_dsn, name)
    finally:
        await drop_database(admin_dsn, name)


async def _while_a_concurrent_update_commits(
    dsn: str, job_id: object, op: Callable[[], Awaitable[Any]]
) -> Any:
    """Run `op` while another transaction holds the job's row with an update, then commits:
    the case where REPEATABLE READ and SERIALIZABLE raise a serialization error."""
    other = await asyncpg.connect(dsn)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute("UPDATE jobs SET updated_at = now() WHERE id = $1", job_id)
        task = asyncio.ensure_future(op())

        async def blocked() -> bool:
            waiting = await other.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
            return bool(waiting)

        await wait_for(blocked, timeout=10)
        await tx.commit()
        return await task
    finally:
        await other.close()


@pytest.mark.parametrize("pooler", ["none", "transaction"])
async def test_cancels_and_completions_work_when_the_database_default_is_stricter(
    strict_dsn: str, pooler: str
) -> None:
    pool = await db.create_pool(strict_dsn, min_size=1, max_size=4, pooler=pooler)
    try:
        queue = Queue(pool)
        await pool.execute("DELETE FROM jobs")
        running = (await queue.enqueue(NewJob(kind="echo"))).job
        waiting = (await queue.enqueue(NewJob(kind="echo"))).job
        [claimed] = await queue.claim("w1", ["echo"], ["default"], 1, lease_seconds=30)
        assert claimed.id == running.id

        cancel = await _while_a_concurrent_update_commits(
            strict_dsn, running.id, lambda: queue.request_cancel(running.id)
        )
        assert cancel.outcome is CancelOutcome.PENDING

        done = await _while_a_concurrent_update_commits(
            strict_dsn, running.id, lambda: queue.complete(lease_of(claimed), {"ok": True})
        )
        assert done is True
        # SKIP LOCKED never waits; a claim right after the commit sees the new row version.
        [claimed_next] = await queue.claim("w1", ["echo"], ["default"], 1, lease_seconds=30)
        assert claimed_next.id == waiting.id
    finally:
        await pool.close()
