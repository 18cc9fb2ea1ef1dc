"""The worker runtime: claims jobs, runs handlers, keeps leases alive, observes cancellation.

One process runs one `Worker`, which is a handful of asyncio tasks:

- claim loop: keeps up to `concurrency` jobs in flight, claiming batches sized to the free
  slots; sleeps until a NOTIFY, a freed slot or the poll interval (delayed and retrying jobs
  have no NOTIFY when they fall due).
- one task per job: runs the handler, then records the outcome.
- completion writer: successes are written in batches, one statement for all that finished
  since the last write; a write that fails is retried until it lands or the lease is gone.
- heartbeat: extends the leases of everything this worker holds and learns of cancel requests
  (the fallback for a missed NOTIFY) and of leases it lost.
- rescuer: returns jobs of dead workers to the queue.
- listener: a dedicated connection for LISTEN, re-established after the database restarts.

Every write is fenced by the job's lease token (see `jobq.queue`), so nothing this worker does
late can overwrite what another worker or an operator decided meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from jobq import db, metrics
from jobq.backoff import Backoff
from jobq.queue import (
    CANCEL_CHANNEL,
    DEFAULT_QUEUE,
    NEW_JOB_CHANNEL,
    InvalidJob,
    Job,
    Lease,
    Queue,
    encode_json,
    lease_of,
)
from jobq.registry import Handler, JobCancelled, JobContext, PayloadInvalid, Registry
from jobq.settings import Settings

log = logging.getLogger("jobq.worker")

MAX_CLAIM_BATCH = 500
MAX_COMPLETION_BATCH = 2000


class _Stop(enum.Enum):
    """Why a running handler was cancelled by the worker."""

    CANCEL_REQUESTED = "cancel requested"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease lost"


@dataclass
class _Run:
    job: Job
    ctx: JobContext
    task: asyncio.Task[None] | None = None
    stop_reason: _Stop | None = None
    hard_cancel: asyncio.TimerHandle | None = None
    started: float = field(default_factory=time.monotonic)


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class _Retrying:
    """Exponential backoff with jitter for reconnect loops: 50 ms doubling to 5 s."""

    def __init__(self) -> None:
        self.delay = 0.05

    def reset(self) -> None:
        self.delay = 0.05

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay * random.uniform(0.5, 1.0))
        self.delay = min(5.0, self.delay * 2)


class Worker:
    def __init__(
        self,
        dsn: str,
        registry: Registry,
        *,
        concurrency: int = 10,
        queues: Sequence[str] = (DEFAULT_QUEUE,),
        settings: Settings | None = None,
        worker_id: str | None = None,
        shutdown_grace: float = 30.0,
        batch_size: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not len(registry):
            raise ValueError("the registry has no handlers")
        self.dsn = dsn
        self.registry = registry
        self.concurrency = concurrency
        self.queues = list(queues)
        self.settings = settings or Settings.from_env()
        self.worker_id = worker_id or default_worker_id()
        self.shutdown_grace = shutdown_grace
        self.batch_size = min(batch_size or concurrency, MAX_CLAIM_BATCH)
        self.kinds = registry.kinds
        # Resolved once, so that a handler's bounds that cannot work with these settings stop
        # the worker at start-up, not at the first failure.
        self._backoff = Backoff(self.settings.retry_base_seconds, self.settings.retry_cap_seconds)
        self._backoffs = {h.kind: h.backoff_with(self._backoff) for h in registry}
        # What a job enqueued without max_attempts gets when this worker claims it.
        self._max_attempts = {h.kind: h.max_attempts for h in registry if h.max_attempts}
        # Sync handlers run in threads of their own: asyncio's default executor has only
        # min(32, cores + 4) threads, which would cap `concurrency` for them.
        self._executor = (
            ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="jobq-handler")
            if any(not h.is_async for h in registry)
            else None
        )
        self.queue: Queue | None = None
        self._runs: dict[uuid.UUID, _Run] = {}
        # Succeeded runs not yet written: lease, result JSON, kind.
        self._pending: dict[uuid.UUID, tuple[Lease, str, str]] = {}
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._pending_added = asyncio.Event()
        self._stopping = asyncio.Event()
        self._force_stop = asyncio.Event()
        self._started = asyncio.Event()
        # Prometheus children per kind: `labels()` costs more than the no-op job it counts.
        self._kind_metrics: dict[str, tuple[Any, Any, Any]] = {}

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def in_flight(self) -> int:
        return len(self._runs)

    def request_stop(self) -> None:
        """Stop claiming; in-flight jobs get `shutdown_grace` seconds to finish.

        A second request ends the grace period at once.
        """
        if self._stopping.is_set():
            self._force_stop.set()
        self._stopping.set()
        self._wake.set()

    async def wait_started(self) -> None:
        await self._started.wait()

    async def run(self) -> None:
        pool = await self._connect_pool()
        self.queue = Queue(
            pool,
            default_max_attempts=self.settings.default_max_attempts,
            default_backoff=self._backoff,
        )
        helpers = [
            asyncio.create_task(self._listen_loop(), name="jobq-listen"),
            asyncio.create_task(self._heartbeat_loop(), name="jobq-heartbeat"),
            asyncio.create_task(self._rescue_loop(), name="jobq-rescue"),
        ]
        writer = asyncio.create_task(self._completion_loop(), name="jobq-completions")
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
            await self._claim_loop()
            await self._drain()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self._flush_pending(deadline=time.monotonic() + 10.0)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.queue.worker_gone(self.worker_id), timeout=2)
            await pool.close()
            if self._executor is not None:
                # Threads of hard-cancelled sync handlers cannot be stopped; do not wait for them.
                self._executor.shutdown(wait=False, cancel_futures=True)
            log.info("worker stopped", extra={"worker_id": self.worker_id})

    async def _connect_pool(self) -> asyncpg.Pool:
        retry = _Retrying()
        while True:
            try:
                return await db.create_pool(
                    self.dsn,
                    min_size=1,
                    max_size=max(4, min(10, 2 + self.concurrency // 50)),
                    pooler=self.settings.pooler,
                    server_settings=self._server_settings(),
                )
            except Exception as exc:
                if not db.is_unavailable(exc):
                    raise
                if self._stopping.is_set():
                    raise
                log.warning("database unavailable at start-up (%s); retrying", exc)
                await retry.sleep()

    def _server_settings(self) -> dict[str, str]:
        # Names this worker's sessions in pg_stat_activity.
        return {"application_name": f"jobq worker {self.worker_id}"[:63]}

    async def _drain(self) -> None:
        """Shutdown: wait for in-flight jobs, then cancel and give back what is left."""
        if self._runs:
            log.info(
                "waiting up to %.1fs for %d running job(s)", self.shutdown_grace, len(self._runs)
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.shutdown_grace
            forced = asyncio.ensure_future(self._force_stop.wait())
            try:
                while self._runs and not forced.done() and loop.time() < deadline:
                    tasks = [r.task for r in self._runs.values() if r.task is not None]
                    await asyncio.wait(
                        [*tasks, forced],
                        timeout=deadline - loop.time(),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
            finally:
                forced.cancel()
        leftover = list(self._runs.values())
        for run in leftover:
            run.stop_reason = run.stop_reason or _Stop.SHUTDOWN
            if run.task is not None:
                run.task.cancel()
        tasks = [r.task for r in leftover if r.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- claiming ----------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        assert self.queue is not None
        retry = _Retrying()
        while not self._stopping.is_set():
            free = self.concurrency - len(self._runs)
            # Back-pressure: do not pile up unwritten completions while the database is away.
            if free <= 0 or len(self._pending) >= MAX_COMPLETION_BATCH:
                self._slot_freed.clear()
                await self._wait_any(self._slot_freed, timeout=self.settings.poll_interval_seconds)
                continue
            want = min(free, self.batch_size)
            self._wake.clear()
            try:
                jobs = await self.queue.claim(
                    self.worker_id,
                    self.kinds,
                    self.queues,
                    want,
                    lease_seconds=self.settings.lease_seconds,
                    max_attempts=self._max_attempts,
                )
            except Exception as exc:
                if not db.is_unavailable(exc):
                    log.exception("claim failed", extra={"worker_id": self.worker_id})
                else:
                    log.warning("database unavailable while claiming: %s", exc)
                await retry.sleep()
                continue
            retry.reset()
            if jobs:
                metrics.WORKER_IN_FLIGHT.inc(len(jobs))
            for job in jobs:
                self._start(job)
            if len(jobs) < want:
                await self._wait_any(self._wake, timeout=self.settings.poll_interval_seconds)

    async def _wait_any(self, event: asyncio.Event, timeout: float) -> None:
        waiters = [
            asyncio.ensure_future(event.wait()),
            asyncio.ensure_future(self._stopping.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _metrics_for(self, kind: str) -> tuple[Any, Any, Any]:
        """(queue wait histogram, duration histogram, succeeded counter) for a kind."""
        m = self._kind_metrics.get(kind)
        if m is None:
            m = self._kind_metrics[kind] = (
                metrics.JOB_QUEUE_WAIT.labels(kind),
                metrics.JOB_DURATION.labels(kind),
                metrics.JOBS_FINISHED.labels(kind, "succeeded"),
            )
        return m

    def _start(self, job: Job) -> None:
        ctx = JobContext(
            id=job.id,
            kind=job.kind,
            queue=job.queue,
            attempt=job.attempts,
            max_attempts=job.max_attempts or self.settings.default_max_attempts,
            worker_id=self.worker_id,
        )
        run = _Run(job, ctx)
        self._runs[job.id] = run
        if job.started_at is not None:
            wait = (job.started_at - max(job.created_at, job.run_at)).total_seconds()
            self._metrics_for(job.kind)[0].observe(max(0.0, wait))
        if job.cancel_requested:
            self._request_cancel(run)
        run.task = asyncio.create_task(self._execute(run), name=f"jobq-job-{job.id}")

    # -- running one job ---------------------------------------------------------------

    async def _execute(self, run: _Run) -> None:
        job = run.job
        handler = self.registry[job.kind]
        extra = {
            "job_id": str(job.id),
            "kind": job.kind,
            "attempt": job.attempts,
            "worker_id": self.worker_id,
        }
        try:
            await self._run_handler(run, handler, extra)
        except Exception:
            # Bookkeeping failed for good (e.g. database gone for longer than the lease):
            # the lease expires and the job is rescued; nothing is lost.
            log.exception("could not record the outcome of a job", extra=extra)
        finally:
            if run.hard_cancel is not None:
                run.hard_cancel.cancel()
            self._runs.pop(job.id, None)
            metrics.WORKER_IN_FLIGHT.dec()
            self._metrics_for(job.kind)[1].observe(time.monotonic() - run.started)
            self._slot_freed.set()

    async def _run_handler(self, run: _Run, handler: Handler, extra: dict[str, Any]) -> None:
        job, ctx = run.job, run.ctx
        try:
            payload = handler.parse_payload(job.payload)
        except PayloadInvalid as exc:
            log.warning("payload invalid; failing permanently", extra=extra)
            await self._fail(run, handler, f"PayloadInvalid: {exc}", permanent=True)
            return
        deadline = asyncio.timeout(handler.timeout)  # None: no deadline
        try:
            async with deadline:
                result = await handler.call(ctx, payload, self._executor)
        except asyncio.CancelledError:
            reason = run.stop_reason
            if reason is None:
                raise  # not ours: the worker itself is being torn down
            await self._stopped(run, reason, extra)
            return
        except JobCancelled as exc:
            await self._cancelled(run, str(exc) or "cancelled on request", extra)
            return
        except Exception as exc:
            # Only our own deadline is a timeout; a handler's own TimeoutError is a failure
            # like any other and keeps its message.
            if isinstance(exc, TimeoutError) and deadline.expired():
                if run.stop_reason is not None:
                    await self._stopped(run, run.stop_reason, extra)
                    return
                log.warning("job timed out after %ss", handler.timeout, extra=extra)
                await self._fail(run, handler, f"TimeoutError: timed out after {handler.timeout}s")
                return
            # The traceback stays in the worker's log: stored errors are shown to API clients.
            log.warning("job failed: %s", type(exc).__name__, extra=extra, exc_info=exc)
            await self._fail(run, handler, _describe(exc))
            return
        if run.stop_reason is _Stop.LEASE_LOST:
            return
        try:
            result_json = encode_json("result", result)
        except InvalidJob as exc:
            # Deterministic: running the handler again would repeat its side effects for the
            # same unstorable value.
            log.warning("result not stored; failing permanently", extra=extra)
            await self._fail(
                run, handler, f"result not stored: the result {exc.message}", permanent=True
            )
            return
        self._pending[job.id] = (lease_of(job), result_json, job.kind)
        self._pending_added.set()

    async def _stopped(self, run: _Run, reason: _Stop, extra: dict[str, Any]) -> None:
        if reason is _Stop.CANCEL_REQUESTED:
            await self._cancelled(run, "cancelled on request (handler interrupted)", extra)
        elif reason is _Stop.SHUTDOWN:
            await self._with_retry(lambda q: q.release([lease_of(run.job)]))
            log.info("job interrupted by shutdown; returned to the queue", extra=extra)
        else:
            log.warning("lease lost; abandoned the run", extra=extra)

    async def _cancelled(self, run: _Run, reason: str, extra: dict[str, Any]) -> None:
        held = await self._with_retry(lambda q: q.mark_cancelled(lease_of(run.job), reason))
        if held:
            metrics.JOBS_FINISHED.labels(run.job.kind, "cancelled").inc()
            log.info("job cancelled", extra=extra)

    async def _fail(
        self, run: _Run, handler: Handler, error: str, *, permanent: bool = False
    ) -> None:
        backoff = self._backoffs[run.job.kind]
        status = await self._with_retry(
            lambda q: q.fail(run.job, error, backoff=backoff, permanent=permanent)
        )
        if status == "retrying":
            metrics.JOBS_FINISHED.labels(run.job.kind, "retried").inc()
        elif status in ("failed_permanent", "cancelled"):
            metrics.JOBS_FINISHED.labels(run.job.kind, status).inc()

    async def _with_retry(self, op: Any) -> Any:
        """Run a bookkeeping write, retrying through database outages for one lease period.

        After that the lease has expired anyway and the job belongs to the rescuer.
        """
        assert self.queue is not None
        deadline = time.monotonic() + self.settings.lease_seconds
        retry = _Retrying()
        while True:
            try:
                return await op(self.queue)
            except Exception as exc:
                if not db.is_unavailable(exc) or time.monotonic() > deadline:
                    raise
                await retry.sleep()

    # -- completions -------------------------------------------------------------------

    async def _completion_loop(self) -> None:
        retry = _Retrying()
        while True:
            await self._pending_added.wait()
            self._pending_added.clear()
            while self._pending:
                try:
                    await self._write_completions()
                    retry.reset()
                except Exception as exc:
                    if not db.is_unavailable(exc):
                        log.exception("writing completions failed")
                    await retry.sleep()

    async def _write_completions(self) -> None:
        assert self.queue is not None
        batch = list(self._pending.items())[:MAX_COMPLETION_BATCH]
        done = await self.queue.complete_many((lease, result) for _, (lease, result, _) in batch)
        succeeded: dict[str, int] = {}
        for job_id, (_, _, kind) in batch:
            if job_id not in done.refused:
                self._pending.pop(job_id, None)
            if job_id in done.held:
                succeeded[kind] = succeeded.get(kind, 0) + 1
        for kind, n in succeeded.items():
            self._metrics_for(kind)[2].inc(n)
        self._slot_freed.set()
        for job_id, (lease, _, kind) in batch:
            if job_id in done.refused:
                # The database refused this result: its job fails for good, once. It stays
                # pending (and leased) until that is written.
                await self._result_refused(lease, kind, done.refused[job_id])
                self._pending.pop(job_id, None)
        if done.refused:
            self._slot_freed.set()

    async def _result_refused(self, lease: Lease, kind: str, reason: str) -> None:
        assert self.queue is not None
        log.warning(
            "result not stored: %s; failing permanently",
            reason,
            extra={"job_id": str(lease.job_id), "kind": kind, "worker_id": self.worker_id},
        )
        status = await self.queue.fail_permanently(lease, f"result not stored: {reason}")
        if status is not None:
            metrics.JOBS_FINISHED.labels(kind, status).inc()

    async def _flush_pending(self, deadline: float) -> None:
        while self._pending and time.monotonic() < deadline:
            try:
                await self._write_completions()
            except Exception as exc:
                log.warning("could not write completions at shutdown: %s", exc)
                await asyncio.sleep(0.2)
        if self._pending:
            log.warning(
                "%d completion(s) not written; their jobs will be rescued", len(self._pending)
            )

    # -- leases and cancellation -------------------------------------------------------

    def _leases(self) -> list[Lease]:
        held = [lease_of(r.job) for r in self._runs.values()]
        held += [lease for lease, _, _ in self._pending.values()]
        return held

    async def _heartbeat_loop(self) -> None:
        """Every heartbeat interval: this worker's presence (the kinds and queues it takes, for
        the dashboard), then the leases of every job it holds."""
        while True:
            await self._announce()
            await asyncio.sleep(self.settings.heartbeat_seconds)
            await self.heartbeat_once()

    async def _announce(self) -> None:
        assert self.queue is not None
        try:
            await self.queue.worker_seen(
                self.worker_id,
                self.kinds,
                self.queues,
                self.concurrency,
                ttl_seconds=max(3 * self.settings.heartbeat_seconds, 1.0),
            )
        except Exception as exc:
            log.debug("could not record worker presence: %s", exc)

    async def heartbeat_once(self) -> None:
        assert self.queue is not None
        leases = self._leases()
        if not leases:
            return
        try:
            result = await self.queue.heartbeat(leases, lease_seconds=self.settings.lease_seconds)
        except Exception as exc:
            log.warning("heartbeat failed: %s", exc)
            return
        for job_id in result.cancel_requested:
            run = self._runs.get(job_id)
            if run is not None:
                self._request_cancel(run)
        for job_id in result.lost:
            self._pending.pop(job_id, None)
            run = self._runs.get(job_id)
            if run is not None and run.task is not None and run.stop_reason is None:
                run.stop_reason = _Stop.LEASE_LOST
                run.task.cancel()

    def _request_cancel(self, run: _Run) -> None:
        if run.ctx.cancelled:
            return
        run.ctx._request_cancel()
        log.info(
            "cancel requested",
            extra={
                "job_id": str(run.job.id),
                "kind": run.job.kind,
                "attempt": run.job.attempts,
                "worker_id": self.worker_id,
            },
        )

        def hard_cancel() -> None:
            if run.task is not None and not run.task.done() and run.stop_reason is None:
                run.stop_reason = _Stop.CANCEL_REQUESTED
                run.task.cancel()

        run.hard_cancel = asyncio.get_running_loop().call_later(
            self.settings.cancel_grace_seconds, hard_cancel
        )

    def _on_cancel_notify(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        try:
            job_id = uuid.UUID(str(payload))
        except ValueError:
            return
        run = self._runs.get(job_id)
        if run is not None:
            self._request_cancel(run)

    # -- background loops --------------------------------------------------------------

    async def _rescue_loop(self) -> None:
        assert self.queue is not None
        while True:
            try:
                for rescued in await self.queue.rescue(backoffs=self._backoffs):
                    metrics.JOBS_FINISHED.labels(rescued.kind, "rescued").inc()
                    log.warning(
                        "rescued a job from a lost worker",
                        extra={"job_id": str(rescued.job_id), "kind": rescued.kind,
                               "status": rescued.status},
                    )  # fmt: skip
            except Exception as exc:
                if not db.is_unavailable(exc):
                    log.exception("rescue failed")
            await asyncio.sleep(self.settings.rescue_interval_seconds * random.uniform(0.8, 1.2))

    async def _listen_loop(self) -> None:
        retry = _Retrying()
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await db.connect(self.dsn, server_settings=self._server_settings())
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(NEW_JOB_CHANNEL, self._on_new_job)
                await conn.add_listener(CANCEL_CHANNEL, self._on_cancel_notify)
                retry.reset()
                # Anything enqueued or cancelled while we were not listening: look now.
                self._wake.set()
                if self._runs:
                    asyncio.get_running_loop().create_task(self.heartbeat_once())
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=5.0)
                    if not lost.is_set():
                        await conn.execute("SELECT 1")  # detects a half-open connection
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
            await retry.sleep()

    def _on_new_job(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        if payload in self.queues or not payload:
            self._wake.set()


def _describe(exc: BaseException) -> str:
    """`Type: message`, what the job's errors keep. No traceback: API clients read errors, and
    frames name server paths; the worker logs the traceback with the job's id instead."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
