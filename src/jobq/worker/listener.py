"""The listener: a dedicated connection for LISTEN, re-established after the database restarts.

A NOTIFY on the new-job channel wakes the claim loop; one on the cancel channel tells the run
at once (the heartbeat is the fallback for a missed one). On each connect the listener checks
that a NOTIFY sent through the pool comes back: behind a transaction pooler it does not, and
then the worker says so once and runs poll-only, finding new jobs every poll interval and
cancels at the next heartbeat, checking again now and then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from jobq import db, metrics
from jobq.queue import CANCEL_CHANNEL, NEW_JOB_CHANNEL, Queue
from jobq.worker.execution import JobRunner
from jobq.worker.state import Retrying, WorkerState

log = logging.getLogger("jobq.worker")

# The listener's self-check: a NOTIFY on this channel must come back within this time.
LISTEN_CHECK_CHANNEL = "jobq_listen_check"
LISTEN_CHECK_SECONDS = 2.0
LISTEN_RECHECK_SECONDS = 300.0


class Listener:
    def __init__(
        self,
        state: WorkerState,
        queue: Queue,
        runner: JobRunner,
        *,
        dsn: str,
        server_settings: dict[str, str],
        heartbeat: Callable[[], Coroutine[Any, Any, bool]],
    ) -> None:
        self.state = state
        self.queue = queue
        self.runner = runner
        self.dsn = dsn
        self.server_settings = server_settings
        # Run once on each (re)connect when jobs are in flight: cancels missed meanwhile.
        self.heartbeat = heartbeat
        self._poll_only = False
        self._warned_poll_only = False

    async def loop(self) -> None:
        """Until cancelled."""
        state = self.state
        settings = state.settings
        retry = Retrying()
        url, pooler = self.dsn, settings.pooler
        if settings.listen_database_url:
            # A direct or session-pooled URL: a session of its own, whatever DATABASE_URL is.
            url = settings.listen_database_url
            pooler = "none" if pooler == "none" else "session"
        while True:
            pause = 0.0
            conn: asyncpg.Connection | None = None
            try:
                conn = await db.connect(url, pooler=pooler, server_settings=self.server_settings)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(NEW_JOB_CHANNEL, self._on_new_job)
                await conn.add_listener(CANCEL_CHANNEL, self.runner.on_cancel_notify)
                retry.reset()
                # Anything enqueued or cancelled while we were not listening: look now.
                state.wake.set()
                if state.runs:
                    asyncio.get_running_loop().create_task(self.heartbeat())
                if not await self._check(conn):
                    # Holding LISTENs a pooler scatters over its server connections helps no
                    # one: close, and check again now and then.
                    pause = LISTEN_RECHECK_SECONDS
                    lost.set()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5.0):
                            await lost.wait()
                    if not lost.is_set():
                        await conn.execute("SELECT 1", timeout=5)  # detects a half-open link
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not db.is_unavailable(exc):
                    log.exception("listener failed")
                else:
                    log.warning("listener lost the database: %s; reconnecting", exc)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=2)
            if pause:
                await asyncio.sleep(pause)
            else:
                await retry.sleep()

    async def _check(self, conn: asyncpg.Connection) -> bool:
        """Send a NOTIFY through the pool and see that the listening session receives it.

        It does not behind a transaction pooler, which runs the LISTEN on whatever server
        connection it lends for that one statement. Then the worker says so once and finds new
        jobs by polling every JOBQ_POLL_INTERVAL_SECONDS, and cancels at the next heartbeat.
        """
        state = self.state
        token = uuid.uuid4().hex
        heard = asyncio.Event()

        def on_check(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
            if payload == token:
                heard.set()

        await conn.add_listener(LISTEN_CHECK_CHANNEL, on_check)
        try:
            await self.queue.pool.execute("SELECT pg_notify($1, $2)", LISTEN_CHECK_CHANNEL, token)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that
            # arrives as the notification does, and the worker would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LISTEN_CHECK_SECONDS):
                    await heard.wait()
        finally:
            await conn.remove_listener(LISTEN_CHECK_CHANNEL, on_check)
        if heard.is_set():
            if self._poll_only:
                log.info(
                    "LISTEN receives notifications again", extra={"worker_id": state.worker_id}
                )
            self._poll_only = False
            metrics.WORKER_POLL_ONLY.set(0)
            return True
        metrics.WORKER_POLL_ONLY.set(1)
        if not self._poll_only and not self._warned_poll_only:
            log.warning(
                "LISTEN on this database connection does not receive notifications (a "
                "transaction-pooling PgBouncer?): set JOBQ_LISTEN_DATABASE_URL to a direct or "
                "session-pooled URL. Until then new jobs are found by polling every %ss "
                "(JOBQ_POLL_INTERVAL_SECONDS) and cancels at the next heartbeat (every %ss)",
                state.settings.poll_interval_seconds,
                state.settings.heartbeat_seconds,
                extra={"worker_id": state.worker_id},
            )
            self._warned_poll_only = True
        self._poll_only = True
        return False

    def _on_new_job(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        if payload in self.state.queues or not payload:
            self.state.wake.set()
