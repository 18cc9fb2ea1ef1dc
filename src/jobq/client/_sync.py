"""`Client`: the jobq HTTP API from synchronous code."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import httpx

from jobq.client import _core
from jobq.client._core import Call, RetryPolicy
from jobq.client.errors import APIError
from jobq.client.models import Cancelled, Enqueued, Job, JobSummary, NewJob, Page

T = TypeVar("T")


class Client:
    """The jobq HTTP API over httpx, for services that do not talk to the database.

    >>> with Client("http://jobq.internal:8000", token="s3cret") as jobq:
    ...     job = jobq.enqueue("email.send", {"to": "a@example.com"}, idempotency_key="o-42").job
    ...     done = jobq.wait(job.id, timeout=30)

    Problem documents are raised as `jobq.client.errors.APIError` subclasses, one per slug.
    Idempotent calls (GETs, and enqueues with an idempotency key) are sent again after a 503
    or a lost connection, `retries` times, with backoff (honouring Retry-After); others only
    after a 503 saying nothing was done. `http` is an httpx.Client of your own (its base URL,
    transport, event hooks); the client then leaves it open.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        headers: Mapping[str, str] | None = None,
        max_wait: float = _core.MAX_WAIT_SECONDS,
        http: httpx.Client | None = None,
    ) -> None:
        self.policy = RetryPolicy(retries, backoff, max_backoff)
        self.timeout = _core.seconds("timeout", timeout, positive=True)
        # The longest `?wait=` one request asks for: at most the API's JOBQ_WAIT_MAX_SECONDS.
        self.max_wait = _core.seconds("max_wait", max_wait, positive=True)
        self._headers = _core.headers(token, headers)
        self._own = http is None
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout)

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, call: Call[T]) -> T:
        request = _core.build(self.http, call, self._headers)
        attempt = 0
        while True:
            try:
                response = self.http.send(request)
            except httpx.TransportError as exc:
                delay = _core.retry_delay(self.policy, call, attempt, None)
                if delay is None:
                    raise _core.give_up(exc) from exc
                time.sleep(delay)
            else:
                delay = _core.retry_delay(self.policy, call, attempt, response)
                if delay is None:
                    return call.parse(response)
                time.sleep(delay)
            attempt += 1

    # -- operations ----------------------------------------------------------------------

    def enqueue(
        self,
        kind: str,
        payload: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        run_at: datetime | None = None,
        idempotency_key: str | None = None,
        concurrency_key: str | None = None,
        unique_for: float | timedelta | None = None,
        unique_by: Sequence[str] | None = None,
        unique_states: Sequence[str] | None = None,
    ) -> Enqueued:
        """`POST /jobs`. With `idempotency_key`, a replay returns the job the key created
        (`created` False), so the call is retried safely. With `unique_for` (seconds or a
        timedelta), a unique job: a duplicate returns the existing job (`created` False)."""
        return self._send(
            _core.enqueue(
                kind, payload, queue=queue, priority=priority, max_attempts=max_attempts,
                run_at=run_at, idempotency_key=idempotency_key, concurrency_key=concurrency_key,
                unique_for=unique_for, unique_by=unique_by, unique_states=unique_states,
            )
        )  # fmt: skip

    def enqueue_batch(self, jobs: Sequence[NewJob]) -> list[Enqueued]:
        """`POST /jobs/batch`: every job stored or none (a ValidationError names each bad one
        by index), in one request; each answered in order with `created`. Retried only when
        every job has an idempotency key."""
        return self._send(_core.enqueue_batch(jobs))

    def get(self, job_id: uuid.UUID | str) -> Job:
        """`GET /jobs/{id}`; NotFound when there is no such job."""
        return self._send(_core.get(job_id))

    def list_page(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        queue: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """One page of `GET /jobs`, newest first; pass its `next_cursor` for the next."""
        return self._send(
            _core.list_page(status=status, kind=kind, queue=queue, limit=limit, cursor=cursor)
        )

    def list_jobs(
        self,
        *,
        status: str | None = None,
        kind: str | None = None,
        queue: str | None = None,
        page_size: int = 200,
    ) -> Iterator[JobSummary]:
        """Every job matching the filters, newest first, fetched a page at a time by cursor
        (stable while new jobs arrive)."""
        cursor: str | None = None
        while True:
            page = self.list_page(
                status=status, kind=kind, queue=queue, limit=page_size, cursor=cursor
            )
            yield from page.jobs
            if page.next_cursor is None or not page.jobs:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: uuid.UUID | str) -> Cancelled:
        """`POST /jobs/{id}/cancel`; JobTerminal when the job already ended."""
        return self._send(_core.cancel(job_id))

    def retry(self, job_id: uuid.UUID | str) -> Job:
        """`POST /jobs/{id}/retry` of a failed or cancelled job; InvalidState otherwise."""
        return self._send(_core.retry(job_id))

    def wait(self, job_id: uuid.UUID | str, timeout: float | None = None) -> Job:
        """The job once it has ended (`GET /jobs/{id}?wait=`, as often as needed), or as it
        is when `timeout` seconds have passed (None: no limit); check `is_terminal`."""
        deadline = _core.wait_deadline(job_id, timeout)
        while True:
            left = self.max_wait if deadline is None else deadline - time.monotonic()
            asked = min(left, self.max_wait)
            try:
                job = self._send(_core.wait_once(job_id, asked, self.timeout, deadline))
            except APIError as exc:
                # The API waits less at a time (JOBQ_WAIT_MAX_SECONDS): ask for that from now on.
                most = _core.wait_bound(exc, asked)
                if most is None:
                    raise
                self.max_wait = most
                continue
            if job.is_terminal or (deadline is not None and time.monotonic() >= deadline):
                return job
