"""The worker runtime: claims jobs, runs handlers, keeps leases alive, observes cancellation.

One process runs one `Worker`, which is a handful of asyncio tasks:

- claim loop: keeps up to `concurrency` jobs in flight, claiming batches sized to the free
  slots; sleeps until a NOTIFY, a freed slot or the poll interval (delayed and retrying jobs
  have no NOTIFY when they fall due).
- one task per job: runs the handler, then records the outcome. Sync (`def`) handlers run in
  daemon threads of the worker's own (see `_HandlerThreads`): a thread cannot be interrupted,
  so a sync run keeps its slot and its lease until its function returns.
- completion writer: successes are written in batches, one statement for all that finished
  since the last write; a write that fails is retried until it lands or the lease is gone.
- heartbeat: extends the leases of everything this worker holds and learns of cancel requests
  (the fallback for a missed NOTIFY) and of leases it lost. Everything about a run is keyed by
  its lease (job id + token), so news about one attempt never touches another.
- maintenance: each service of `jobq.maintenance` (the rescuer, which returns jobs of dead
  workers to the queue, ...) in a loop of its own.
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
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

import asyncpg

from jobq import db, maintenance, metrics
from jobq.backoff import Backoff
from jobq.maintenance import Service
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
# The listener's self-check: a NOTIFY on this channel must come back within this time.
LISTEN_CHECK_CHANNEL = "jobq_listen_check"
LISTEN_CHECK_SECONDS = 2.0
LISTEN_RECHECK_SECONDS = 300.0
MAX_COMPLETION_BATCH = 2000
# After the grace period, how long the worker keeps trying to write what it owes the database
# (releases, outcomes) before it gives up and exits; a second signal gives up at once.
SHUTDOWN_WRITE_SECONDS = 5.0


class _Stop(enum.Enum):
    """Why a running handler was cancelled by the worker."""

    CANCEL_REQUESTED = "cancel requested"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease lost"


class _SyncCall:
    """One call of a sync handler, handed to a handler thread.

    `started` resolves (with the monotonic start time) when a thread begins the call, `done`
    with its outcome. A call not yet begun can be abandoned; once begun, it runs to the end.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any):
        self._loop = loop
        self._fn = fn
        self._args = args
        self._lock = threading.Lock()
        self._begun = False
        self._abandoned = False
        self._returned = False
        self.started: asyncio.Future[float] = loop.create_future()
        self.done: asyncio.Future[Any] = loop.create_future()
        # Nobody may be waiting any more (the worker stopped): do not warn about it.
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())

    @property
    def thread_alive(self) -> bool:
        """True while a thread is inside the handler function."""
        return self._begun and not self._returned

    def abandon(self) -> bool:
        """Make sure the call never begins; False when a thread is already running it."""
        with self._lock:
            if not self._begun:
                self._abandoned = True
            return self._abandoned

    def run(self) -> None:
        """In a handler thread."""
        with self._lock:
            if self._abandoned:
                return
            self._begun = True
        self._notify(self.started, time.monotonic(), None)
        try:
            result = self._fn(*self._args)
        except BaseException as exc:
            self._returned = True
            # asyncio futures refuse StopIteration, and SystemExit must not end the worker.
            if isinstance(exc, StopIteration) or not isinstance(exc, Exception):
                wrapped = RuntimeError(f"handler raised {type(exc).__name__}: {exc}")
                wrapped.__cause__ = exc
                exc = wrapped
            self._notify(self.done, None, exc)
        else:
            self._returned = True
            self._notify(self.done, result, None)

    def _notify(self, fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
        def settle() -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody to tell
            self._loop.call_soon_threadsafe(settle)


class _HandlerThreads:
    """Threads for sync handlers, at most `size`, started as needed.

    Daemon threads, unlike a ThreadPoolExecutor's: a thread cannot be interrupted, and the
    interpreter joins non-daemon threads at exit, so one handler that never returns would hold
    the process past its shutdown deadline.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._calls: SimpleQueue[_SyncCall | None] = SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def submit(self, call: _SyncCall) -> None:
        self._calls.put(call)
        if self._idle.acquire(blocking=False):
            return
        with self._lock:
            if len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._work, name=f"jobq-handler-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def shutdown(self) -> None:
        """Let idle threads end; busy ones end with their call (or with the process)."""
        for _ in self._threads:
            self._calls.put(None)

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            call.run()
            self._idle.release()


@dataclass
class _Run:
    job: Job
    ctx: JobContext
    lease: Lease
    task: asyncio.Task[None] | None = None
    stop_reason: _Stop | None = None
    hard_cancel: asyncio.TimerHandle | None = None
    # When the handler really started: for a sync handler, when a thread began the call.
    started: float = field(default_factory=time.monotonic)
    sync_call: _SyncCall | None = None
    # Set when the handler's own `timeout=` expired (not a TimeoutError the handler raised).
    timed_out: bool = False

    @property
    def thread_alive(self) -> bool:
        return self.sync_call is not None and self.sync_call.thread_alive


def default_pool_size(concurrency: int) -> int:
    """Connections a worker's pool may open: 4, then 2 + concurrency/50 from concurrency 150,
    at most 10 (see docs/deploy.md for the whole budget)."""
    return max(4, min(10, 2 + concurrency // 50))


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
        pool_size: int | None = None,
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
            _HandlerThreads(concurrency) if any(not h.is_async for h in registry) else None
        )
        self.queue: Queue | None = None
        # Keyed by lease: two attempts of one job can be on this worker at once (the first's
        # lease lost while its thread still runs, the second claimed meanwhile).
        self._runs: dict[Lease, _Run] = {}
        # Succeeded runs not yet written: lease, result JSON, kind.
        self._pending: dict[Lease, tuple[Lease, str, str]] = {}
        # Set when the grace period ends: the deadline for the writes still owed.
        self._write_deadline: float | None = None
        self._heartbeat_failing = False
        self._heartbeat_skipping = False
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._pending_added = asyncio.Event()
        self._stopping = asyncio.Event()
        self._force_stop = asyncio.Event()
        self._started = asyncio.Event()
        self._poll_only = False
        self._warned_poll_only = False
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
        await self._wait_for_primary(pool)
        self.queue = Queue(
            pool,
            default_max_attempts=self.settings.default_max_attempts,
            default_backoff=self._backoff,
        )
        helpers = [
            asyncio.create_task(self._listen_loop(), name="jobq-listen"),
            asyncio.create_task(self._heartbeat_loop(), name="jobq-heartbeat"),
        ]
        helpers += [
            asyncio.create_task(run_service(service), name=f"jobq-{service.name}")
            for service in maintenance.services(self.queue, self.settings, backoffs=self._backoffs)
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
            await self._flush_pending(deadline=self._shutdown_write_deadline())
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            # Goodbyes are bounded by the shutdown deadline too (at least a moment for each).
            if not self._force_stop.is_set():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.queue.worker_gone(self.worker_id), timeout=self._time_left(2.0)
                    )
            try:
                await asyncio.wait_for(pool.close(), timeout=self._time_left(2.0))
            except Exception:
                pool.terminate()  # the database is unreachable: do not wait for goodbyes
            if self._threads is not None:
                self._threads.shutdown()
            log.info("worker stopped", extra={"worker_id": self.worker_id})

    def _time_left(self, most: float) -> float:
        left = self._shutdown_write_deadline() - time.monotonic()
        return max(0.2, min(most, left))

    def _shutdown_write_deadline(self) -> float:
        if self._write_deadline is None:
            self._write_deadline = time.monotonic() + SHUTDOWN_WRITE_SECONDS
        return self._write_deadline

    async def _connect_pool(self) -> asyncpg.Pool:
        retry = _Retrying()
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
                if self._stopping.is_set():
                    raise
                log.warning("database unavailable at start-up (%s); retrying", exc)
                await retry.sleep()

    async def _wait_for_primary(self, pool: asyncpg.Pool) -> None:
        """Pointed at a hot standby, a worker says so once and waits for it to be promoted."""
        said = False
        while not self._stopping.is_set():
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
            await self._wait_any(self._stopping, timeout=self.settings.poll_interval_seconds)

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
        self._shutdown_write_deadline()
        leftover = list(self._runs.values())
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
        run = _Run(job, ctx, lease_of(job))
        self._runs[run.lease] = run
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
        except Exception as exc:
            # Bookkeeping failed for good (e.g. database gone for longer than the lease, or
            # past the shutdown deadline): the lease expires and the job is rescued.
            if db.is_unavailable(exc):
                log.warning(
                    "could not record the outcome of a job (database unavailable: %s); the "
                    "lease expires and the job is rescued",
                    exc or type(exc).__name__,
                    extra=extra,
                )
            else:
                log.exception("could not record the outcome of a job", extra=extra)
        finally:
            if run.hard_cancel is not None:
                run.hard_cancel.cancel()
            self._runs.pop(run.lease, None)
            metrics.WORKER_IN_FLIGHT.dec()
            self._metrics_for(job.kind)[1].observe(time.monotonic() - run.started)
            self._slot_freed.set()

    async def _run_handler(self, run: _Run, handler: Handler, extra: dict[str, Any]) -> None:
        job = run.job
        try:
            payload = handler.parse_payload(job.payload)
        except PayloadInvalid as exc:
            log.warning("payload invalid; failing permanently", extra=extra)
            await self._fail(run, handler, f"PayloadInvalid: {exc}", permanent=True)
            return
        try:
            result = await self._invoke(run, handler, payload, extra)
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
            if isinstance(exc, TimeoutError) and run.timed_out:
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
        self._pending[run.lease] = (run.lease, result_json, job.kind)
        self._pending_added.set()

    async def _invoke(
        self, run: _Run, handler: Handler, payload: Any, extra: dict[str, Any]
    ) -> Any:
        """Call the handler under its timeout, counted from the handler's real start."""
        if handler.is_async:
            if handler.timeout is None:
                return await handler.call(run.ctx, payload)
            timer = asyncio.timeout(handler.timeout)
            try:
                async with timer:
                    return await handler.call(run.ctx, payload)
            except TimeoutError:
                run.timed_out = timer.expired()
                raise
        assert self._threads is not None
        call = _SyncCall(asyncio.get_running_loop(), handler.fn, run.ctx, payload)
        run.sync_call = call
        self._threads.submit(call)
        run.started = await call.started
        if handler.timeout is None:
            return await asyncio.shield(call.done)
        await asyncio.wait([call.done], timeout=handler.timeout)
        if call.done.done():
            return call.done.result()
        run.timed_out = True
        log.warning(
            "sync handler timed out after %ss; a thread cannot be interrupted, so the job stays "
            "leased until the function returns, then fails as timed out",
            handler.timeout,
            extra=extra,
        )
        with contextlib.suppress(Exception):
            await asyncio.shield(call.done)
        raise TimeoutError

    async def _stopped(self, run: _Run, reason: _Stop, extra: dict[str, Any]) -> None:
        if reason is _Stop.CANCEL_REQUESTED:
            await self._cancelled(run, "cancelled on request (handler interrupted)", extra)
        elif reason is _Stop.SHUTDOWN:
            if run.thread_alive:
                log.warning("job left leased: its sync handler is still running", extra=extra)
                return
            await self._with_retry(lambda q: q.release([run.lease]))
            log.info("job interrupted by shutdown; returned to the queue", extra=extra)
        else:
            log.warning("lease lost; abandoned the run", extra=extra)

    async def _cancelled(self, run: _Run, reason: str, extra: dict[str, Any]) -> None:
        held = await self._with_retry(lambda q: q.mark_cancelled(run.lease, reason))
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

        After that the lease has expired anyway and the job belongs to the rescuer. Once the
        grace period of a shutdown is over, retries stop at the shutdown write deadline, and
        after a second stop request there are none.
        """
        assert self.queue is not None
        deadline = time.monotonic() + self.settings.lease_seconds
        retry = _Retrying()
        while True:
            try:
                return await op(self.queue)
            except Exception as exc:
                if self._write_deadline is not None:
                    deadline = min(deadline, self._write_deadline)
                if (
                    not db.is_unavailable(exc)
                    or time.monotonic() > deadline
                    or self._force_stop.is_set()
                ):
                    raise
                await self._sleep_unless_forced(retry)

    async def _sleep_unless_forced(self, retry: _Retrying) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._force_stop.wait(), retry.delay * random.uniform(0.5, 1))
        retry.delay = min(5.0, retry.delay * 2)

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
        for lease, (_, _, kind) in batch:
            if lease.job_id not in done.refused:
                self._pending.pop(lease, None)
            if lease.job_id in done.held:
                succeeded[kind] = succeeded.get(kind, 0) + 1
        for kind, n in succeeded.items():
            self._metrics_for(kind)[2].inc(n)
        self._slot_freed.set()
        for lease, (_, _, kind) in batch:
            if lease.job_id in done.refused:
                # The database refused this result: its job fails for good, once. It stays
                # pending (and leased) until that is written.
                await self._result_refused(lease, kind, done.refused[lease.job_id])
                self._pending.pop(lease, None)
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
        retry = _Retrying()
        while self._pending and time.monotonic() < deadline:
            try:
                await self._write_completions()
            except Exception as exc:
                log.warning("could not write completions at shutdown: %s", exc)
                if self._force_stop.is_set():
                    break
                await self._sleep_unless_forced(retry)
        if self._pending:
            log.warning(
                "%d completion(s) not written; their jobs will be rescued", len(self._pending)
            )

    # -- leases and cancellation -------------------------------------------------------

    def _leases(self) -> list[Lease]:
        held = [lease for lease, r in self._runs.items() if r.stop_reason is not _Stop.LEASE_LOST]
        held += list(self._pending)
        return held

    async def _heartbeat_loop(self) -> None:
        """Every heartbeat interval: this worker's presence (the kinds and queues it takes, for
        the dashboard), then the leases of every job it holds. A heartbeat that could not
        extend every lease is tried again soon, well before the lease runs out."""
        soon = max(0.05, min(1.0, self.settings.heartbeat_seconds / 4))
        delay = self.settings.heartbeat_seconds
        while True:
            await self._announce()
            await asyncio.sleep(delay)
            complete = await self.heartbeat_once()
            delay = self.settings.heartbeat_seconds if complete else soon

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

    async def heartbeat_once(self) -> bool:
        """Extend every lease this worker holds; False when some could not be (try again soon).

        The statement is bounded: one that is stuck (a table lock) must not hold the loop.
        """
        assert self.queue is not None
        leases = self._leases()
        if not leases:
            return True
        timeout = min(max(1.0, self.settings.heartbeat_seconds), self.settings.lease_seconds / 2)
        try:
            result = await self.queue.heartbeat(
                leases, lease_seconds=self.settings.lease_seconds, timeout=timeout
            )
        except Exception as exc:
            # Once per streak: it is retried soon, and an outage would repeat it many times.
            (log.debug if self._heartbeat_failing else log.warning)(
                "heartbeat failed: %s", exc or type(exc).__name__
            )
            self._heartbeat_failing = True
            return False
        if self._heartbeat_failing:
            log.info("heartbeat succeeded again")
            self._heartbeat_failing = False
        for lease in result.cancel_requested:
            run = self._runs.get(lease)
            if run is not None:
                self._request_cancel(run)
        for lease in result.lost:
            self._pending.pop(lease, None)
            run = self._runs.get(lease)
            if run is not None and run.stop_reason is None:
                self._lease_lost(run)
        if result.skipped and not self._heartbeat_skipping:
            log.warning(
                "%d lease(s) not extended: their rows are locked by another session; "
                "trying again soon",
                len(result.skipped),
                extra={"job_ids": ",".join(str(lease.job_id) for lease in result.skipped)},
            )
        self._heartbeat_skipping = bool(result.skipped)
        return not result.skipped

    def _lease_lost(self, run: _Run) -> None:
        run.stop_reason = _Stop.LEASE_LOST
        if run.sync_call is not None and not run.sync_call.abandon():
            log.warning(
                "lease lost while the sync handler runs; it cannot be interrupted: its outcome "
                "will be discarded",
                extra=self._extra(run),
            )
            return
        if run.task is not None:
            run.task.cancel()

    def _extra(self, run: _Run) -> dict[str, Any]:
        return {
            "job_id": str(run.job.id),
            "kind": run.job.kind,
            "attempt": run.job.attempts,
            "worker_id": self.worker_id,
        }

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
            if run.task is None or run.task.done() or run.stop_reason is not None:
                return
            if run.sync_call is not None and not run.sync_call.abandon():
                log.warning(
                    "the sync handler did not stop for the cancel request; a thread cannot be "
                    "interrupted, so the job ends when the function returns",
                    extra=self._extra(run),
                )
                return
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
        for run in list(self._runs.values()):
            if run.job.id == job_id:
                self._request_cancel(run)

    # -- background loops --------------------------------------------------------------

    async def _listen_loop(self) -> None:
        retry = _Retrying()
        url, pooler = self.dsn, self.settings.pooler
        if self.settings.listen_database_url:
            # A direct or session-pooled URL: a session of its own, whatever DATABASE_URL is.
            url = self.settings.listen_database_url
            pooler = "none" if pooler == "none" else "session"
        while True:
            pause = 0.0
            conn: asyncpg.Connection | None = None
            try:
                conn = await db.connect(url, pooler=pooler, server_settings=self._server_settings())
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(NEW_JOB_CHANNEL, self._on_new_job)
                await conn.add_listener(CANCEL_CHANNEL, self._on_cancel_notify)
                retry.reset()
                # Anything enqueued or cancelled while we were not listening: look now.
                self._wake.set()
                if self._runs:
                    asyncio.get_running_loop().create_task(self.heartbeat_once())
                if not await self._check_listen(conn):
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

    async def _check_listen(self, conn: asyncpg.Connection) -> bool:
        """Send a NOTIFY through the pool and see that the listening session receives it.

        It does not behind a transaction pooler, which runs the LISTEN on whatever server
        connection it lends for that one statement. Then the worker says so once and finds new
        jobs by polling every JOBQ_POLL_INTERVAL_SECONDS, and cancels at the next heartbeat.
        """
        assert self.queue is not None
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
                log.info("LISTEN receives notifications again", extra={"worker_id": self.worker_id})
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
                self.settings.poll_interval_seconds,
                self.settings.heartbeat_seconds,
                extra={"worker_id": self.worker_id},
            )
            self._warned_poll_only = True
        self._poll_only = True
        return False

    def _on_new_job(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        if payload in self.queues or not payload:
            self._wake.set()


async def run_service(service: Service) -> None:
    """Run one maintenance service until cancelled: a first pass after a jittered delay
    (workers started together do not all run it at once), then one every `interval`, +-10 %.
    A failed pass is logged and the next one comes on time."""
    await asyncio.sleep(service.interval * random.uniform(0.0, 0.1))
    while True:
        try:
            await service.run_once()
        except Exception as exc:
            # An outage is logged by the loops that wait it out; a pass just comes later.
            if not db.is_unavailable(exc):
                log.exception("%s failed", service.name, extra={"service": service.name})
        await asyncio.sleep(service.interval * random.uniform(0.9, 1.1))


def _describe(exc: BaseException) -> str:
    """`Type: message`, what the job's errors keep. No traceback: API clients read errors, and
    frames name server paths; the worker logs the traceback with the job's id instead."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
