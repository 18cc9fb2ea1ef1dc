"""`Worker`: one per process. It owns the state its loops share, starts them, and stops them.

A worker is a handful of asyncio tasks, each in a module of its own: the claim loop
(`claimer`), one task per job (`execution`, with sync handlers in `threads`), the completion
writer (`completions`), the heartbeat (`heartbeat`), the listener (`listener`) and the
maintenance services (`maintenance`). Shutdown: stop claiming, give in-flight jobs the grace
period, cancel and release what is left, write what is owed until the shutdown deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Sequence

import asyncpg

from jobq import db, maintenance, middleware
from jobq.backoff import Backoff
from jobq.maintenance import Partitioner
from jobq.queue import Limits, Queue
from jobq.registry import Registry
from jobq.settings import Settings
from jobq.worker import maintenance as maintenance_runner
from jobq.worker.claimer import MAX_CLAIM_BATCH, Claimer
from jobq.worker.completions import CompletionWriter
from jobq.worker.execution import JobRunner
from jobq.worker.heartbeat import Heartbeat
from jobq.worker.listener import Listener
from jobq.worker.progress import ProgressWriter
from jobq.worker.state import Retrying, Stop, WorkerState
from jobq.worker.threads import HandlerThreads

log = logging.getLogger("jobq.worker")


def default_pool_size(concurrency: int) -> int:
    """Connections a worker's pool may open: 4, then 2 + concurrency/50 from concurrency 150,
    at most 10 (see docs/deploy.md for the whole budget)."""
    return max(4, min(10, 2 + concurrency // 50))


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        dsn: str,
        registry: Registry,
        *,
        concurrency: int = 10,
        queues: Sequence[str] | None = None,
        settings: Settings | None = None,
        worker_id: str | None = None,
        shutdown_grace: float = 30.0,
        batch_size: int | None = None,
        pool_size: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not len(registry):
            raise ValueError("the registry has no handlers")
        self.dsn = dsn
        self.registry = registry
        self.concurrency = concurrency
        # By default the queues the registry names (Registry.queues): a queue declared with
        # limits, or one a schedule enqueues into, is one its workers must work.
        self.queues = list(registry.queues if queues is None else queues)
        self.settings = settings or Settings.from_env()
        self.worker_id = worker_id or default_worker_id()
        self.shutdown_grace = shutdown_grace
        self.batch_size = min(batch_size or concurrency, MAX_CLAIM_BATCH)
        if pool_size is not None and pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        # Claims, completions and heartbeats are batched: a few connections serve hundreds of
        # jobs in flight. The listener holds one more connection of its own.
        self.pool_size = pool_size or default_pool_size(concurrency)
        self.kinds = registry.kinds
        # Resolved once, so that a handler's bounds that cannot work with these settings stop
        # the worker at start-up, not at the first failure.
        self._backoff = Backoff(self.settings.retry_base_seconds, self.settings.retry_cap_seconds)
        self._backoffs = {h.kind: h.backoff_with(self._backoff) for h in registry}
        # What a job enqueued without max_attempts gets when this worker claims it.
        self._max_attempts = {h.kind: h.max_attempts for h in registry if h.max_attempts}
        # Sync handlers run in threads of their own, one per slot: asyncio's default executor
        # has only min(32, cores + 4) threads, which would cap `concurrency` for them.
        self._threads = (
            HandlerThreads(concurrency) if any(not h.is_async for h in registry) else None
        )
        self.queue: Queue | None = None
        self._state = WorkerState(
            self.worker_id,
            self.settings,
            kinds=self.kinds,
            queues=self.queues,
            concurrency=concurrency,
        )
        self._heartbeat: Heartbeat | None = None
        self._started = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._state.stopping.is_set()

    @property
    def in_flight(self) -> int:
        return len(self._state.runs)

    def request_stop(self) -> None:
        """Stop claiming; in-flight jobs get `shutdown_grace` seconds to finish.

        A second request ends the grace period at once.
        """
        state = self._state
        if state.stopping.is_set():
            state.force_stop.set()
        state.stopping.set()
        state.wake.set()

    async def wait_started(self) -> None:
        await self._started.wait()

    async def _leaves_first(self, queue: Queue) -> None:
        """One partitioner pass before the first claim: a job that ends lands in the history
        leaf holding its finish time and stays as long as that leaf, so the leaves must
        already be as narrow as the retention asks (a fresh install has day-wide ones)."""
        try:
            await Partitioner(queue, self.settings).create_ahead()
        except (asyncpg.PostgresError, OSError) as exc:  # its own loop tries again soon
            log.warning("history leaves not prepared before claiming: %s", exc)

    async def _declare_limits(self, queue: Queue) -> None:
        """Store the limits this worker's registry declares for its kinds and queues (and
        clear those it declares none for): the last worker to start wins."""
        retry = Retrying()
        queue_limits = self.registry.queue_limits
        while True:
            try:
                await queue.declare_limits(
                    self.worker_id,
                    self.registry.kind_limits,
                    {q: queue_limits.get(q, Limits()) for q in self.queues},
                )
                return
            except Exception as exc:
                if not db.is_unavailable(exc) or self._state.stopping.is_set():
                    raise
                log.warning("database unavailable while storing limits: %s", exc)
                await retry.sleep()

    async def heartbeat_once(self) -> bool:
        """Extend every lease this worker holds; False when some could not be (try again soon)."""
        assert self._heartbeat is not None, "the worker is not running"
        return await self._heartbeat.once()

    async def run(self) -> None:
        state = self._state
        if self.settings.otel:
            from jobq import otel

            otel.instrument()
        pool = await self._connect_pool()
        await self._wait_for_primary(pool)
        self.queue = queue = Queue(
            pool,
            default_max_attempts=self.settings.default_max_attempts,
            default_backoff=self._backoff,
            history_leaf_width=self.settings.history_leaf_width,
            idempotency_window=self.settings.idempotency_window,
            max_result_bytes=self.settings.max_payload_bytes,
        )
        progress = ProgressWriter(state, queue)
        runner = JobRunner(
            state,
            queue,
            self.registry,
            threads=self._threads,
            backoffs=self._backoffs,
            progress=progress,
            # Process-wide middleware outermost, as installed when the worker starts.
            middleware=middleware.run_chain([*middleware.installed(), *self.registry.middleware]),
        )
        claimer = Claimer(
            state, queue, runner, batch_size=self.batch_size, max_attempts=self._max_attempts
        )
        completions = CompletionWriter(state, queue)
        self._heartbeat = heartbeat = Heartbeat(state, queue, runner)
        listener = Listener(
            state,
            queue,
            runner,
            dsn=self.dsn,
            server_settings=self._server_settings(),
            heartbeat=heartbeat.once,
        )
        await self._leaves_first(queue)
        await self._declare_limits(queue)
        helpers = [
            asyncio.create_task(listener.loop(), name="jobq-listen"),
            asyncio.create_task(heartbeat.loop(), name="jobq-heartbeat"),
            asyncio.create_task(progress.loop(), name="jobq-progress"),
            *maintenance_runner.start(
                maintenance.services(
                    queue,
                    self.settings,
                    backoffs=self._backoffs,
                    schedules=self.registry.schedules,
                )
            ),
        ]
        writer = asyncio.create_task(completions.loop(), name="jobq-completions")
        log.info(
            "worker started",
            extra={
                "worker_id": self.worker_id,
                "kinds": ",".join(self.kinds),
                "queues": ",".join(self.queues),
                "concurrency": self.concurrency,
            },
        )
        self._started.set()
        try:
            await claimer.loop()
            await self._drain()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await completions.flush(deadline=state.shutdown_write_deadline())
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            # Goodbyes are bounded by the shutdown deadline too (at least a moment for each).
            if not state.force_stop.is_set():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        queue.worker_gone(self.worker_id), timeout=state.time_left(2.0)
                    )
            try:
                await asyncio.wait_for(pool.close(), timeout=state.time_left(2.0))
            except Exception:
                pool.terminate()  # the database is unreachable: do not wait for goodbyes
            if self._threads is not None:
                self._threads.shutdown()
            log.info("worker stopped", extra={"worker_id": self.worker_id})

    async def _connect_pool(self) -> asyncpg.Pool:
        retry = Retrying()
        while True:
            try:
                return await db.create_pool(
                    self.dsn,
                    min_size=1,
                    max_size=self.pool_size,
                    pooler=self.settings.pooler,
                    server_settings=self._server_settings(),
                    # A statement that waits longer than a lease is pointless: the lease it
                    # serves has expired. Bounded, a stuck one is cancelled and retried.
                    command_timeout=max(5.0, self.settings.lease_seconds),
                )
            except Exception as exc:
                if not db.is_unavailable(exc):
                    raise
                if self._state.stopping.is_set():
                    raise
                log.warning("database unavailable at start-up (%s); retrying", exc)
                await retry.sleep()

    async def _wait_for_primary(self, pool: asyncpg.Pool) -> None:
        """Pointed at a hot standby, a worker says so once and waits for it to be promoted."""
        state = self._state
        said = False
        while not state.stopping.is_set():
            try:
                if not await db.in_recovery(pool):
                    if said:
                        log.info("the database is writable now; starting")
                    return
            except Exception as exc:
                if not db.is_unavailable(exc):
                    raise
            else:
                if not said:
                    log.warning(
                        "the database is a read-only standby (in recovery): waiting until it "
                        "is promoted; point DATABASE_URL at the primary to run jobs now",
                        extra={"worker_id": self.worker_id},
                    )
                    said = True
            await state.wait_any(state.stopping, timeout=self.settings.poll_interval_seconds)

    def _server_settings(self) -> dict[str, str]:
        # Names this worker's sessions in pg_stat_activity.
        return {"application_name": f"jobq worker {self.worker_id}"[:63]}

    async def _drain(self) -> None:
        """Shutdown: wait for in-flight jobs, then cancel and give back what is left."""
        state = self._state
        if state.runs:
            log.info(
                "waiting up to %.1fs for %d running job(s)", self.shutdown_grace, len(state.runs)
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.shutdown_grace
            forced = asyncio.ensure_future(state.force_stop.wait())
            try:
                while state.runs and not forced.done() and loop.time() < deadline:
                    tasks = [r.task for r in state.runs.values() if r.task is not None]
                    await asyncio.wait(
                        [*tasks, forced],
                        timeout=deadline - loop.time(),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
            finally:
                forced.cancel()
        state.shutdown_write_deadline()
        leftover = list(state.runs.values())
        stuck = [r for r in leftover if r.sync_call is not None and not r.sync_call.abandon()]
        if stuck:
            log.warning(
                "%d sync handler(s) still running after the grace period; a thread cannot be "
                "interrupted, so their jobs stay leased (not released: that would let another "
                "worker run them while they still run here) and are rescued once the lease "
                "expires",
                len(stuck),
                extra={"job_ids": ",".join(str(r.job.id) for r in stuck)},
            )
        for run in leftover:
            run.stop_reason = run.stop_reason or Stop.SHUTDOWN
            if run.task is not None:
                run.task.cancel()
        tasks = [r.task for r in leftover if r.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
