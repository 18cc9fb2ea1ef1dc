"""Running one job: one task per claimed job runs its handler, then records the outcome.

The handler runs under its own `timeout=`, counted from its real start (for a sync handler,
when a thread begins the call; see `jobq.worker.threads`). Cancellation is cooperative first:
a cancel request (a NOTIFY, or the heartbeat's news) sets `ctx.cancelled`, and a handler still
running `cancel_grace_seconds` later is cancelled hard. A shutdown past its grace period or a
lost lease cancels the run at once. Every outcome is written fenced by the run's lease token
(see `jobq.queue`), so nothing this worker does late can overwrite what another worker or an
operator decided meanwhile; successes go to the completion writer to be written in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from jobq import db, metrics
from jobq.backoff import Backoff
from jobq.middleware import RunChain
from jobq.queue import InvalidJob, Job, Queue, encode_json, lease_of
from jobq.registry import Handler, JobCancelled, JobContext, PayloadInvalid, Registry, Snooze
from jobq.worker.progress import ProgressWriter
from jobq.worker.state import Retrying, Run, Stop, WorkerState
from jobq.worker.threads import HandlerThreads, SyncCall

log = logging.getLogger("jobq.worker")


class JobRunner:
    def __init__(
        self,
        state: WorkerState,
        queue: Queue,
        registry: Registry,
        *,
        threads: HandlerThreads | None,
        backoffs: Mapping[str, Backoff],
        middleware: RunChain | None = None,
        progress: ProgressWriter | None = None,
    ) -> None:
        self.progress = progress
        self.state = state
        self.queue = queue
        self.registry = registry
        self.threads = threads
        self.backoffs = backoffs
        # None without middleware: handlers are then called directly.
        self.middleware = middleware

    def start(self, job: Job) -> None:
        """Run a job just claimed, in a task of its own."""
        state = self.state
        ctx = JobContext(
            id=job.id,
            kind=job.kind,
            queue=job.queue,
            attempt=job.attempts,
            max_attempts=job.max_attempts or state.settings.default_max_attempts,
            worker_id=state.worker_id,
            trace_context=job.trace_context,
        )
        run = Run(job, ctx, lease_of(job))
        state.runs[run.lease] = run
        if self.progress is not None:
            self.progress.attach(run)
        if job.started_at is not None:
            wait = (job.started_at - max(job.created_at, job.run_at)).total_seconds()
            state.metrics_for(job.kind)[0].observe(max(0.0, wait))
        if job.cancel_requested:
            self.request_cancel(run)
        run.task = asyncio.create_task(self._execute(run), name=f"jobq-job-{job.id}")

    # -- cancellation ------------------------------------------------------------------

    def request_cancel(self, run: Run) -> None:
        """A cancel request for a run: tell the handler, and cancel it hard after the grace."""
        if run.ctx.cancelled:
            return
        run.ctx._request_cancel()
        log.info("cancel requested", extra=self.state.extra(run))

        def hard_cancel() -> None:
            if run.task is None or run.task.done() or run.stop_reason is not None:
                return
            if run.sync_call is not None and not run.sync_call.abandon():
                log.warning(
                    "the sync handler did not stop for the cancel request; a thread cannot be "
                    "interrupted, so the job ends when the function returns",
                    extra=self.state.extra(run),
                )
                return
            run.stop_reason = Stop.CANCEL_REQUESTED
            run.task.cancel()

        run.hard_cancel = asyncio.get_running_loop().call_later(
            self.state.settings.cancel_grace_seconds, hard_cancel
        )

    def on_cancel_notify(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        try:
            job_id = uuid.UUID(str(payload))
        except ValueError:
            return
        for run in list(self.state.runs.values()):
            if run.job.id == job_id:
                self.request_cancel(run)

    def lease_lost(self, run: Run) -> None:
        run.stop_reason = Stop.LEASE_LOST
        if run.sync_call is not None and not run.sync_call.abandon():
            log.warning(
                "lease lost while the sync handler runs; it cannot be interrupted: its outcome "
                "will be discarded",
                extra=self.state.extra(run),
            )
            return
        if run.task is not None:
            run.task.cancel()

    # -- running -----------------------------------------------------------------------

    async def _execute(self, run: Run) -> None:
        job = run.job
        handler = self.registry[job.kind]
        extra = self.state.extra(run)
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
            self.state.runs.pop(run.lease, None)
            metrics.WORKER_IN_FLIGHT.dec()
            self.state.metrics_for(job.kind)[1].observe(time.monotonic() - run.started)
            self.state.slot_freed.set()
            if run.lease not in self.state.pending:
                self.state.outcome_written.set()

    async def _run_handler(self, run: Run, handler: Handler, extra: dict[str, Any]) -> None:
        job = run.job
        bad_payload: list[PayloadInvalid] = []

        async def call() -> Any:
            try:
                payload = handler.parse_payload(job.payload)
            except PayloadInvalid as exc:
                bad_payload.append(exc)
                raise
            return await self._invoke(run, handler, payload, extra)

        try:
            result = await (call() if self.middleware is None else self.middleware(run.ctx, call))
        except asyncio.CancelledError:
            reason = run.stop_reason
            if reason is None:
                raise  # not ours: the worker itself is being torn down
            await self._stopped(run, reason, extra)
            return
        except JobCancelled as exc:
            await self._cancelled(run, str(exc) or "cancelled on request", extra)
            return
        except Snooze as exc:
            await self._snoozed(run, exc.seconds, extra)
            return
        except Exception as exc:
            if bad_payload and exc is bad_payload[0]:
                log.warning("payload invalid; failing permanently", extra=extra)
                await self._fail(run, f"PayloadInvalid: {exc}", permanent=True)
                return
            # Only our own deadline is a timeout; a handler's own TimeoutError is a failure
            # like any other and keeps its message.
            if isinstance(exc, TimeoutError) and run.timed_out:
                if run.stop_reason is not None:
                    await self._stopped(run, run.stop_reason, extra)
                    return
                log.warning("job timed out after %ss", handler.timeout, extra=extra)
                await self._fail(run, f"TimeoutError: timed out after {handler.timeout}s")
                return
            # The traceback stays in the worker's log: stored errors are shown to API clients.
            log.warning("job failed: %s", type(exc).__name__, extra=extra, exc_info=exc)
            await self._fail(run, describe(exc))
            return
        if run.stop_reason is Stop.LEASE_LOST:
            return
        await self._flush_progress(run)
        try:
            result_json = encode_json("result", result)
        except InvalidJob as exc:
            # Deterministic: running the handler again would repeat its side effects for the
            # same unstorable value.
            log.warning("result not stored; failing permanently", extra=extra)
            await self._fail(run, f"result not stored: the result {exc.message}", permanent=True)
            return
        self.state.pending[run.lease] = (run.lease, result_json, job.kind)
        self.state.pending_added.set()

    async def _invoke(self, run: Run, handler: Handler, payload: Any, extra: dict[str, Any]) -> Any:
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
        assert self.threads is not None
        call = SyncCall(asyncio.get_running_loop(), handler.fn, run.ctx, payload)
        run.sync_call = call
        self.threads.submit(call)
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

    # -- outcomes ----------------------------------------------------------------------

    async def _stopped(self, run: Run, reason: Stop, extra: dict[str, Any]) -> None:
        if reason is Stop.CANCEL_REQUESTED:
            await self._cancelled(run, "cancelled on request (handler interrupted)", extra)
        elif reason is Stop.SHUTDOWN:
            if run.thread_alive:
                log.warning("job left leased: its sync handler is still running", extra=extra)
                return
            await self._with_retry(lambda q: q.release([run.lease]))
            log.info("job interrupted by shutdown; returned to the queue", extra=extra)
        else:
            log.warning("lease lost; abandoned the run", extra=extra)

    async def _flush_progress(self, run: Run) -> None:
        """The run's last progress report, written before its outcome (best effort)."""
        if self.progress is not None and self.progress.unwritten(run):
            with contextlib.suppress(Exception):
                await self.progress.flush(run)

    async def _cancelled(self, run: Run, reason: str, extra: dict[str, Any]) -> None:
        await self._flush_progress(run)
        held = await self._with_retry(lambda q: q.mark_cancelled(run.lease, reason))
        if held:
            metrics.JOBS_FINISHED.labels(run.job.kind, "cancelled").inc()
            log.info("job cancelled", extra=extra)

    async def _snoozed(self, run: Run, seconds: float, extra: dict[str, Any]) -> None:
        status = await self._with_retry(lambda q: q.snooze(run.lease, seconds))
        if status == "cancelled":
            metrics.JOBS_FINISHED.labels(run.job.kind, "cancelled").inc()
        elif status is not None:
            log.info("job snoozed for %ss", seconds, extra=extra)

    async def _fail(self, run: Run, error: str, *, permanent: bool = False) -> None:
        await self._flush_progress(run)
        backoff = self.backoffs[run.job.kind]
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
        state = self.state
        deadline = time.monotonic() + state.settings.lease_seconds
        retry = Retrying()
        while True:
            try:
                return await op(self.queue)
            except Exception as exc:
                if state.write_deadline is not None:
                    deadline = min(deadline, state.write_deadline)
                if (
                    not db.is_unavailable(exc)
                    or time.monotonic() > deadline
                    or state.force_stop.is_set()
                ):
                    raise
                await state.sleep_unless_forced(retry)


def describe(exc: BaseException) -> str:
    """`Type: message`, what the job's errors keep. No traceback: API clients read errors, and
    frames name server paths; the worker logs the traceback with the job's id instead."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
