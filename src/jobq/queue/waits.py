"""Waiting for jobs: `Queue.wait`, and through it `GET /jobs/{id}?wait=`.

One `Watcher` per `Queue` serves every waiter of the process with one LISTEN connection and
one statement at a time on the pool:

- A waiter marks its job `watched` (one UPDATE for all the waiters that arrived meanwhile),
  then reads it (one SELECT for all of them, in a new snapshot: a job that ended before the
  mark is seen ended). The statements that end a job, or write its progress, send a NOTIFY
  on `jobq_job_events` for watched rows only (`notify_watchers`): nobody waits, nothing is
  sent, and no commit is serialised behind the NOTIFY queue's lock.
- A notification names a job; the jobs named meanwhile are read again in one SELECT, and each
  waiter whose condition holds (the job ended; or, asked for, its progress changed) is
  answered with the job as read.
- Where LISTEN hears nothing (PgBouncer in transaction pooling mode: the session that ran
  LISTEN is not the one a NOTIFY reaches), the self-check on connect says so and the watcher
  polls instead: one SELECT of every waited job each `POLL_SECONDS`, shared by all waiters.
  With JOBQ_LISTEN_DATABASE_URL (a direct or session-pooled URL) it listens there.

The LISTEN connection is borrowed from the pool (or opened on the listen URL) when the first
waiter arrives and given back `LINGER_SECONDS` after the last one left: a process where nobody
waits holds nothing for it. After a lost connection every waited job is read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from jobq import db
from jobq.queue.base import Connection, QueueBase
from jobq.queue.inserts import _GET_MANY_TEXT, job_from_row
from jobq.queue.lookup import finished_not_before
from jobq.queue.model import JOB_EVENTS_CHANNEL, Job, JobNotFound

log = logging.getLogger("jobq.wait")

Until = Literal["end", "progress"]

POLL_SECONDS = 0.1
LINGER_SECONDS = 2.0
PROBE_SECONDS = 5.0
CHECK_SECONDS = 2.0
CHECK_CHANNEL = "jobq_wait_check"
# How long a waiter whose wait is over waits for the shared read before reading on its own.
FINAL_READ_SECONDS = 2.0

# Marks jobs as waited on. A row locked by someone else (a claim or a completion in flight)
# is skipped, not waited for, and marked at the next pass: one locked row must not hold every
# other waiter's mark.
_WATCH = """
WITH free AS (
    SELECT id FROM jobs
    WHERE id = ANY($1::uuid[]) AND watched IS NOT TRUE
    ORDER BY id
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs SET watched = true FROM free WHERE jobs.id = free.id RETURNING jobs.id
"""
_STILL_UNMARKED = """
SELECT id FROM jobs WHERE id = ANY($1::uuid[]) AND watched IS NOT TRUE
"""


@dataclass(eq=False)
class _Waiter:
    job_id: uuid.UUID
    until: Until
    done: asyncio.Future[Job | None]
    # The progress when the wait began (until="progress"); set by the first read.
    baseline: Any = None
    started: bool = False
    # The wait is over: answered with the job as the next read finds it.
    final: bool = False


@dataclass
class _Pending:
    """What the next pass does: jobs to mark, jobs to read."""

    mark: set[uuid.UUID] = field(default_factory=set)
    read: set[uuid.UUID] = field(default_factory=set)


class Watcher:
    def __init__(self, queue: QueueBase, listen_dsn: str | None, pooler: str) -> None:
        self.queue = queue
        self.listen_dsn = listen_dsn
        self.pooler = pooler
        self.waiters: dict[uuid.UUID, list[_Waiter]] = {}
        self.pending = _Pending()
        self._kick = asyncio.Event()
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._passes: asyncio.Task[None] | None = None
        self.poll_only = False
        self.ending = False  # set by end_waits: every wait is over at once

    # -- waiting -------------------------------------------------------------------------

    async def wait(self, job_id: uuid.UUID, timeout: float | None, until: Until) -> Job:
        if self.ending:
            timeout = 0
        self._start()
        loop = asyncio.get_running_loop()
        waiter = _Waiter(job_id, until, loop.create_future())
        self.waiters.setdefault(job_id, []).append(waiter)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    # Listening first: an ending that commits after the mark is then heard.
                    await self._listening.wait()
                    self.pending.mark.add(job_id)
                    self._kick.set()
                    return self._found(job_id, await asyncio.shield(waiter.done))
            if self._listening.is_set() and not waiter.done.done():
                # The wait is over: the job as it is now, read with the others' next pass
                # (a thousand waiters timing out at once cost one statement, not a thousand).
                waiter.final = True
                self.pending.read.add(job_id)
                self._kick.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FINAL_READ_SECONDS):
                        return self._found(job_id, await asyncio.shield(waiter.done))
            if waiter.done.done() and not waiter.done.cancelled():
                return self._found(job_id, waiter.done.result())
            return await self._read_one(job_id)  # no pass came: ask on its own
        finally:
            waiting = self.waiters.get(job_id)
            if waiting is not None:
                waiting.remove(waiter)
                if not waiting:
                    del self.waiters[job_id]
            if not waiter.done.done():
                waiter.done.cancel()
            if not self.waiters:
                self._kick.set()  # the listener may linger, then let go

    def end_waits(self) -> None:
        """Every wait, and every later one, is over: each is answered with its job as the next
        read finds it (what a wait's timeout does), all in one statement."""
        self.ending = True
        for waiting in self.waiters.values():
            for waiter in waiting:
                waiter.final = True
        self.pending.read.update(self.waiters)
        self._kick.set()

    @staticmethod
    def _found(job_id: uuid.UUID, job: Job | None) -> Job:
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def _read_one(self, job_id: uuid.UUID) -> Job:
        rows = await self.queue.pool.fetch(_GET_MANY_TEXT, [job_id], finished_not_before(job_id))
        if not rows:
            raise JobNotFound(job_id)
        return job_from_row(rows[0])

    # -- the listener and the passes -----------------------------------------------------

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="jobq-wait-listener"
            )
        if self._passes is None or self._passes.done():
            self._passes = asyncio.get_running_loop().create_task(
                self._pass_loop(), name="jobq-wait-passes"
            )

    async def close(self) -> None:
        for task in (self._task, self._passes):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._task, self._passes) if t is not None), return_exceptions=True
        )
        self._task = self._passes = None
        self._listening.clear()

    async def _run(self) -> None:
        """Holds the LISTEN while anyone waits (and LINGER_SECONDS more); polls where LISTEN
        hears nothing."""
        while True:
            try:
                await self._listen_while_waited()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not db.is_unavailable(exc):
                    log.exception("waiting for jobs: the listener failed")
                else:
                    log.warning("waiting for jobs: the listener lost the database: %s", exc)
                self._listening.clear()
                await asyncio.sleep(0.5)
            if not self.waiters:
                return

    async def _listen_while_waited(self) -> None:
        lost = asyncio.Event()
        async with self._listen_connection() as conn:

            def on_lost(_conn: Any) -> None:
                lost.set()

            conn.add_termination_listener(on_lost)
            try:
                self.poll_only = not await self._check(conn)
                await conn.add_listener(JOB_EVENTS_CHANNEL, self._on_event)
                if self.poll_only:  # listening still: the check is made once per connection
                    log.warning(
                        "waiting for jobs: LISTEN on this connection hears no notifications (a"
                        " transaction-pooling PgBouncer?); polling every %ss instead. Set"
                        " JOBQ_LISTEN_DATABASE_URL to a direct or session-pooled URL.",
                        POLL_SECONDS,
                    )
                # Whatever ended while nobody listened: read every waited job again.
                self.pending.read.update(self.waiters)
                self._listening.set()
                self._kick.set()
                idle_since: float | None = None
                loop = asyncio.get_running_loop()
                probed = loop.time()
                while not lost.is_set():
                    if self.waiters:
                        idle_since = None
                    elif idle_since is None:
                        idle_since = loop.time()
                    elif loop.time() - idle_since >= LINGER_SECONDS:
                        return
                    await asyncio.sleep(POLL_SECONDS if self.poll_only else 0.25)
                    if self.poll_only and self.waiters:
                        self.pending.read.update(self.waiters)
                        self._kick.set()
                    if self.waiters and loop.time() - probed >= PROBE_SECONDS:
                        # A link that died without a word delivers nothing: find out.
                        probed = loop.time()
                        await conn.execute("SELECT 1", timeout=PROBE_SECONDS)
                raise ConnectionError("the LISTEN connection was lost")
            finally:
                self._listening.clear()
                # A borrowed connection goes back to the pool as it came: no listener left.
                conn.remove_termination_listener(on_lost)
                if not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.remove_listener(JOB_EVENTS_CHANNEL, self._on_event)

    @contextlib.asynccontextmanager
    async def _listen_connection(self) -> Any:
        if self.listen_dsn is not None:
            conn = await db.connect(self.listen_dsn, pooler=self.pooler)
            try:
                yield conn
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)
            return
        async with self.queue.pool.acquire() as borrowed:
            yield borrowed

    async def _check(self, conn: Connection) -> bool:
        """A NOTIFY sent through the pool must reach this connection (see jobq.worker's)."""
        token = uuid.uuid4().hex
        heard = asyncio.Event()

        def on_check(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
            if payload == token:
                heard.set()

        await conn.add_listener(CHECK_CHANNEL, on_check)
        try:
            await self.queue.pool.execute("SELECT pg_notify($1, $2)", CHECK_CHANNEL, token)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHECK_SECONDS):
                    await heard.wait()
        finally:
            await conn.remove_listener(CHECK_CHANNEL, on_check)
        return heard.is_set()

    def _on_event(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        try:
            job_id = uuid.UUID(str(payload))
        except ValueError:
            return
        if job_id in self.waiters:
            self.pending.read.add(job_id)
            self._kick.set()

    async def _pass_loop(self) -> None:
        """One statement at a time: marks, then reads, for everything pending."""
        while True:
            await self._kick.wait()
            self._kick.clear()
            if not self.pending.mark and not self.pending.read:
                if not self.waiters:
                    return  # started again by the next waiter
                continue
            pending, self.pending = self.pending, _Pending()
            try:
                await self._pass(pending)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not db.is_unavailable(exc):
                    log.exception("waiting for jobs: a read failed")
                # Tried again shortly; every waiter's own timeout still bounds its wait.
                self.pending.mark |= pending.mark
                self.pending.read |= pending.read
                await asyncio.sleep(0.5)
                self._kick.set()

    async def _pass(self, pending: _Pending) -> None:
        pool = self.queue.pool
        mark = [i for i in pending.mark if i in self.waiters]
        if mark:
            await pool.fetch(_WATCH, mark)
            # Live, unmarked and locked by someone else: marked at the next pass.
            skipped = {r["id"] for r in await pool.fetch(_STILL_UNMARKED, mark)}
            if skipped:
                self.pending.mark |= skipped
                asyncio.get_running_loop().call_later(0.05, self._kick.set)
        ids = [i for i in {*mark, *pending.read} if i in self.waiters]
        if not ids:
            return
        bound = min(finished_not_before(i) for i in ids)
        found = {r["id"]: job_from_row(r) for r in await pool.fetch(_GET_MANY_TEXT, ids, bound)}
        for job_id in ids:
            self._answer(job_id, found.get(job_id))

    def _answer(self, job_id: uuid.UUID, job: Job | None) -> None:
        for waiter in list(self.waiters.get(job_id, ())):
            if waiter.done.done():
                continue
            if job is None or waiter.final or job.is_terminal:
                waiter.done.set_result(job)
            elif waiter.until == "progress":
                if not waiter.started:
                    waiter.started = True
                    waiter.baseline = job.progress
                elif job.progress != waiter.baseline:
                    waiter.done.set_result(job)
            else:
                waiter.started = True


class Waits(QueueBase):
    _watcher: Watcher
    listen_dsn: str | None
    pooler: str

    async def wait(
        self, job_id: uuid.UUID, timeout: float | None = None, *, until: Until = "end"
    ) -> Job:
        """The job once it has ended, or as it is when `timeout` seconds have passed (None:
        no limit). `until="progress"`: also as soon as its progress changes. JobNotFound
        when there is no such job. Every waiter of this `Queue` shares one LISTEN connection
        (see `jobq.queue.waits`)."""
        if until not in ("end", "progress"):
            raise ValueError("until must be 'end' or 'progress'")
        if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
            raise ValueError("timeout must be a finite number >= 0, or None")
        return await self._watcher.wait(job_id, timeout, until)

    def end_waits(self) -> None:
        """Answer every wait now, and every later one at once, with the job as it is (when the
        server shuts down: it must not take as long as the longest wait)."""
        self._watcher.end_waits()

    async def close_watcher(self) -> None:
        """Stop waiting for jobs and give back the LISTEN connection (at shutdown)."""
        await self._watcher.close()
