"""What the sync and the async client share: each operation as a request and a parser, the
retry policy, and reading answers. Only httpx and the standard library."""

from __future__ import annotations

import email.utils
import math
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import httpx

from jobq.client.errors import (
    APIError,
    InvalidRequest,
    TransportError,
    UnexpectedResponse,
    problem_error,
)
from jobq.client.models import Cancelled, Enqueued, Job, NewJob, Page

T = TypeVar("T")

PROBLEM = "application/problem+json"
# The longest single `?wait=` the API accepts by default (JOBQ_WAIT_MAX_SECONDS); a longer
# wait is several requests.
MAX_WAIT_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One operation: the request, whether it may be sent again, and how to read the answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, str] | None = None
    json: Any = None
    headers: Mapping[str, str] | None = None
    # Safe to send again after a 503 or a lost connection: GETs, and enqueues with a key.
    idempotent: bool = False
    # Seconds to wait for the answer, when longer than the client's timeout (a `?wait=`).
    timeout: float | None = None
    # No retry sleeps past this (time.monotonic()): a `wait`'s own timeout.
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, `backoff` doubling to `max_backoff`; a 503's
    Retry-After (seconds or an HTTP date) is honoured instead, capped at `max_backoff`."""

    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.retries, int) or self.retries < 0:
            raise InvalidRequest(f"retries must be an int >= 0, got {self.retries!r}")
        seconds("backoff", self.backoff)
        seconds("max_backoff", self.max_backoff)

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            after = retry_after(response.headers.get("retry-after"))
            if after is not None:
                return min(self.max_backoff, after)
        return random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now (RFC 9110 10.2.3); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def seconds(name: str, value: float, *, positive: bool = False) -> float:
    """`value` if it is a finite number of seconds >= 0 (> 0 when `positive`); a NaN or an
    infinity would make a deadline that never comes."""
    bound = "> 0" if positive else ">= 0"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        raise InvalidRequest(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return float(value)


# RFC 9110 5.1 and 5.5, as h11 checks them when sending: a token for a name; visible ASCII,
# with spaces or tabs only inside, for a value.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?")


def _header_value(name: str, value: Any) -> str:
    """`value` when it can be sent as header `name`. The message does not show it: it may be
    a secret."""
    if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
        raise InvalidRequest(
            f"{name} must be printable ASCII, without line breaks or spaces at its ends"
        )
    return value


def build(
    http: httpx.Client | httpx.AsyncClient, call: Call[Any], headers: Mapping[str, str]
) -> httpx.Request:
    """The request of `call`, built once for all its attempts; what cannot be encoded (a
    payload that is not JSON, text with lone surrogates) is refused here, before any send."""
    try:
        return http.build_request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            headers={**headers, **(call.headers or {})},
            timeout=call.timeout or httpx.USE_CLIENT_DEFAULT,
        )
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"the request cannot be encoded: {exc}") from None


# 503s after which the request was certainly not carried out, so any call may be sent again:
# the server refused the connection before reading it, or the database refused the write.
_NOT_CARRIED_OUT = frozenset({"too_many_connections", "database_read_only"})


# What a proxy or load balancer in front of the API answers while it restarts or is slow: the
# request may or may not have reached the API.
_GATEWAY = frozenset({502, 504})


def should_retry(call: Call[Any], response: httpx.Response | None) -> bool:
    """An idempotent call is sent again after a 503, a gateway's 502 or 504, or no answer at
    all; any call after a 503 that says nothing was done."""
    if response is None or response.status_code in _GATEWAY:
        return call.idempotent
    if response.status_code != 503:
        return False
    return call.idempotent or _slug(response) in _NOT_CARRIED_OUT


def _slug(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    slug = body.get("error") if isinstance(body, dict) else None
    return slug if isinstance(slug, str) else None


def retry_delay(
    policy: RetryPolicy, call: Call[Any], attempt: int, response: httpx.Response | None
) -> float | None:
    """Seconds to sleep before sending `call` again after `response` (None: no answer); None
    when it is not sent again: not idempotent, retries spent, or its deadline would pass."""
    if attempt >= policy.retries or not should_retry(call, response):
        return None
    delay = policy.delay(attempt, response)
    if call.deadline is not None and time.monotonic() + delay >= call.deadline:
        return None
    return delay


def give_up(exc: httpx.TransportError) -> TransportError:
    error = TransportError(f"no answer from the jobq API: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def raise_for_problem(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    ctype = response.headers.get("content-type", "")
    if ctype.startswith(PROBLEM) or ctype.startswith("application/json"):
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "error" in body:
            raise problem_error(response.status_code, body)
    raise UnexpectedResponse(response.status_code, "not a problem document", response.text)


def body_of(response: httpx.Response) -> Any:
    raise_for_problem(response)
    try:
        return response.json()
    except ValueError:
        raise UnexpectedResponse(
            response.status_code, "the body is not JSON", response.text
        ) from None


def _parsed(fn: Callable[[Any], T]) -> Callable[[httpx.Response], T]:
    def parse(response: httpx.Response) -> T:
        data = body_of(response)
        try:
            return fn(data)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise UnexpectedResponse(
                response.status_code, f"the body does not fit: {type(exc).__name__}: {exc}",
                response.text,
            ) from None  # fmt: skip

    return parse


def _enqueued(response: httpx.Response) -> Enqueued:
    job = _parsed(Job.from_json)(response)
    return Enqueued(job, created=response.status_code == 201)


def _id(job_id: uuid.UUID | str) -> str:
    try:
        return str(uuid.UUID(str(job_id)))
    except ValueError:
        raise InvalidRequest(f"a job id is a UUID, got {str(job_id)[:100]!r}") from None


def _payload(payload: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if payload is None:
        return {}
    if not isinstance(payload, Mapping):
        raise InvalidRequest(
            f"a payload is a JSON object (a Mapping), got {type(payload).__name__}"
        )
    return payload


def enqueue(
    kind: str,
    payload: Mapping[str, Any] | None,
    *,
    queue: str | None,
    priority: int | None,
    max_attempts: int | None,
    run_at: datetime | None,
    idempotency_key: str | None,
    concurrency_key: str | None = None,
    unique_for: float | timedelta | None = None,
    unique_by: Sequence[str] | None = None,
    unique_states: Sequence[str] | None = None,
) -> Call[Enqueued]:
    new = NewJob(
        kind, _payload(payload), queue, priority, max_attempts, run_at,
        concurrency_key=concurrency_key, unique_for=unique_for, unique_by=unique_by,
        unique_states=unique_states,
    )  # fmt: skip
    headers = {}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = _header_value("idempotency_key", idempotency_key)
    return Call(
        "POST", "/jobs", _enqueued, json=new.to_json(), headers=headers,
        idempotent=idempotency_key is not None,
    )  # fmt: skip


def _batch(response: httpx.Response) -> list[Enqueued]:
    def parse(data: Any) -> list[Enqueued]:
        return [Enqueued(Job.from_json(j), created=bool(j["created"])) for j in data["jobs"]]

    return _parsed(parse)(response)


def enqueue_batch(jobs: Sequence[NewJob]) -> Call[list[Enqueued]]:
    """`POST /jobs/batch`: idempotent (so retried) when every job has an idempotency key."""
    for job in jobs:
        if not isinstance(job, NewJob):
            # jobq.NewJob (the queue core's) looks the same and is the first one imported.
            raise InvalidRequest(
                "enqueue_batch takes jobq.client.NewJob, got"
                f" {type(job).__module__}.{type(job).__qualname__}"
            )
        _payload(job.payload)
    keyed = all(j.idempotency_key is not None for j in jobs)
    body = {"jobs": [j.to_json() for j in jobs]}
    return Call("POST", "/jobs/batch", _batch, json=body, idempotent=keyed)


def get(job_id: uuid.UUID | str) -> Call[Job]:
    return Call("GET", f"/jobs/{_id(job_id)}", _parsed(Job.from_json), idempotent=True)


def list_page(
    *,
    status: str | None,
    kind: str | None,
    queue: str | None,
    limit: int | None,
    cursor: str | None,
) -> Call[Page]:
    given = {"status": status, "kind": kind, "queue": queue, "cursor": cursor}
    params = {k: v for k, v in given.items() if v is not None}
    if limit is not None:
        params["limit"] = str(limit)
    return Call("GET", "/jobs", _parsed(Page.from_json), params=params, idempotent=True)


def cancel(job_id: uuid.UUID | str) -> Call[Cancelled]:
    return Call("POST", f"/jobs/{_id(job_id)}/cancel", _parsed(Cancelled.from_json))


def retry(job_id: uuid.UUID | str) -> Call[Job]:
    return Call("POST", f"/jobs/{_id(job_id)}/retry", _parsed(Job.from_json))


def wait_once(
    job_id: uuid.UUID | str, wait: float, read_timeout: float, deadline: float | None
) -> Call[Job]:
    """One `GET /jobs/{id}?wait=`: answered when the job ends or after `wait` seconds; not
    retried past `deadline`."""
    wait = max(0.0, wait)
    return Call(
        "GET", f"/jobs/{_id(job_id)}", _parsed(Job.from_json),
        params={"wait": f"{wait:.3f}".rstrip("0").rstrip(".") or "0"}, idempotent=True,
        timeout=wait + read_timeout, deadline=deadline,
    )  # fmt: skip


def wait_bound(exc: APIError, asked: float) -> float | None:
    """The API's JOBQ_WAIT_MAX_SECONDS when `exc` is its refusal of a `?wait=` longer than
    that (its `wait_max_seconds`), and it is below what was asked; else None."""
    most = exc.body.get("wait_max_seconds")
    if exc.error != "validation_error" or isinstance(most, bool):
        return None
    if not isinstance(most, int | float) or not 0 < most < asked:
        return None
    return float(most)


def wait_deadline(job_id: uuid.UUID | str, timeout: float | None) -> float | None:
    """When `wait` gives up (time.monotonic()), None for never; refuses a bad id or timeout
    before the first request."""
    _id(job_id)
    if timeout is None:
        return None
    return time.monotonic() + seconds("timeout", timeout)


def headers(token: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    out = {"Accept": f"application/json, {PROBLEM}", "User-Agent": "jobq-client"}
    if token is not None:
        out["Authorization"] = _header_value("token", f"Bearer {token}")
    for name, value in (extra or {}).items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise InvalidRequest(f"{str(name)[:100]!r} is not a header name")
        out[name] = _header_value(f"header {name}", value)
    return out
