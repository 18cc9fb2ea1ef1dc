"""A SQLAlchemy session per job, opened and committed by a jobq middleware.

Every run gets its own `AsyncSession` in one transaction: committed when the handler returns,
rolled back when it raises (or is cancelled). A commit that fails fails the attempt, and jobq
retries it like any failure. Handlers reach the session with `session()`.

    APP_DATABASE_URL=postgresql+asyncpg://app@db/app jobq worker sqlalchemy_session:registry
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from jobq import JobContext, Registry
from jobq.middleware import CallNext

engine = create_async_engine(os.environ["APP_DATABASE_URL"])
Session = async_sessionmaker(engine, expire_on_commit=False)
_current: ContextVar[AsyncSession] = ContextVar("jobq_session")


def session() -> AsyncSession:
    """The session of the job running in this task."""
    return _current.get()


registry = Registry()


@registry.use
async def session_per_job(ctx: JobContext, call_next: CallNext) -> Any:
    async with Session() as s, s.begin():  # commit on return, roll back on an exception
        token = _current.set(s)
        try:
            return await call_next()
        finally:
            _current.reset(token)


@registry.handler("order.confirm")
async def confirm_order(ctx: JobContext, payload: dict[str, Any]) -> None:
    await session().execute(
        text("UPDATE orders SET status = 'confirmed' WHERE id = :id"), {"id": payload["order_id"]}
    )
