"""Checking and encoding what clients send, before any statement runs."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from datetime import UTC
from typing import Any

import orjson

from jobq.queue.model import (
    LIST_LIMIT_DEFAULT,
    LIST_LIMIT_MAX,
    MAX_ATTEMPTS_MAX,
    MAX_ATTEMPTS_MIN,
    MAX_CONCURRENCY_KEY_LENGTH,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_NAME_LENGTH,
    PRIORITY_MAX,
    PRIORITY_MIN,
    RUN_AT_MAX,
    RUN_AT_MIN,
    InvalidJob,
    NewJob,
)

NOT_PRINTABLE = "must be printable: no control or format characters, no separator but the space"


def _check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidJob(field, "must be a non-empty string")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidJob(field, f"must be at most {MAX_NAME_LENGTH} characters")
    if not value.isprintable():
        # str.isprintable: format characters (U+200B), separators but the space, unassigned
        # code points too, not only the C0 and C1 controls.
        raise InvalidJob(field, NOT_PRINTABLE)
    if value in (".", ".."):
        # Browsers and most HTTP clients resolve them away in /queues/{name}/pause.
        raise InvalidJob(field, "must not be '.' or '..': no URL path can name it")
    return value


def check_idempotency_key(key: str) -> str:
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
        raise InvalidJob("idempotency_key", f"must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters")
    if not all(" " <= ch <= "~" for ch in key):
        raise InvalidJob("idempotency_key", "must be printable ASCII")
    return key


def is_utf8(text: str) -> bool:
    """Whether PostgreSQL can store the text: a lone surrogate (from `surrogateescape`, or
    JSON's "\\ud800") cannot be encoded, and the driver's error would name no field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_concurrency_key(key: object) -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_CONCURRENCY_KEY_LENGTH:
        raise InvalidJob(
            "concurrency_key", f"must be a string of 1 to {MAX_CONCURRENCY_KEY_LENGTH} characters"
        )
    # The C0 and C1 controls, as the API's schema states it.
    if any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in key):
        raise InvalidJob("concurrency_key", "must not contain control characters")
    if not is_utf8(key):
        raise InvalidJob("concurrency_key", "must be valid Unicode (no lone surrogates)")
    return key


def encode_json(field: str, value: Any) -> str:
    """JSON text Postgres jsonb accepts, or InvalidJob: jsonb cannot hold NUL characters, and
    JSON has no NaN or Infinity (the encoder would write them as null, silently)."""
    try:
        text = orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidJob(field, f"is not JSON Postgres can store ({exc})") from None
    if "\\u0000" in text:
        raise InvalidJob(field, "must not contain \\u0000 (NUL) characters")
    # Only output with a null can hide a non-finite number: most values skip the walk.
    if "null" in text and _has_non_finite(value):
        raise InvalidJob(field, "must not contain NaN or Infinity (JSON has no such numbers)")
    return text


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    return False


# The largest trace context stored with a job, as the sum of its names' and values' lengths:
# a W3C traceparent is 55 characters, a tracestate at most 32 members.
MAX_TRACE_CONTEXT_BYTES = 4096


def _check_trace_context(value: object) -> None:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise InvalidJob("trace_context", "must map names to strings")
    if sum(len(k) + len(v) for k, v in value.items()) > MAX_TRACE_CONTEXT_BYTES:
        raise InvalidJob("trace_context", f"must be at most {MAX_TRACE_CONTEXT_BYTES} characters")
    if any("\x00" in k or "\x00" in v for k, v in value.items()):
        raise InvalidJob("trace_context", "must not contain NUL characters")


def _validated_at(index: int, job: NewJob) -> NewJob:
    try:
        return validate(job)
    except InvalidJob as exc:
        exc.index = index
        raise


def validate_each(jobs: Sequence[NewJob]) -> list[NewJob]:
    """Each job validated; the InvalidJob of a bad one names its position (`index`)."""
    return [_validated_at(i, job) for i, job in enumerate(jobs)]


def validate_changed(changed: Sequence[NewJob], checked: Sequence[NewJob]) -> list[NewJob]:
    """`changed`, what enqueue middleware made of `checked` (validated already), with each job
    a middleware replaced validated again; the InvalidJob of a bad one names its position."""
    return [
        job if job is before else _validated_at(i, job)
        for i, (job, before) in enumerate(zip(changed, checked, strict=True))
    ]


def validate(job: NewJob) -> NewJob:
    """Return the job checked (naive run_at taken as UTC), or raise InvalidJob.

    max_attempts stays None when not given: it is resolved when a worker claims the job, from
    that worker's handler, whichever way the job was enqueued."""
    _check_name("kind", job.kind)
    _check_name("queue", job.queue)
    if not isinstance(job.payload, dict):
        raise InvalidJob("payload", "must be a JSON object")
    if isinstance(job.priority, bool) or not isinstance(job.priority, int):
        raise InvalidJob("priority", "must be an integer")
    if not PRIORITY_MIN <= job.priority <= PRIORITY_MAX:
        raise InvalidJob("priority", f"must be between {PRIORITY_MIN} and {PRIORITY_MAX}")
    max_attempts = job.max_attempts
    if max_attempts is not None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise InvalidJob("max_attempts", "must be an integer")
        if not MAX_ATTEMPTS_MIN <= max_attempts <= MAX_ATTEMPTS_MAX:
            raise InvalidJob(
                "max_attempts", f"must be between {MAX_ATTEMPTS_MIN} and {MAX_ATTEMPTS_MAX}"
            )
    run_at = job.run_at
    if run_at is not None:
        if run_at.tzinfo is None:
            run_at = run_at.replace(tzinfo=UTC)  # naive times are UTC
        # The driver reads the first and last representable instants as -/+infinity.
        try:
            in_range = RUN_AT_MIN < run_at.astimezone(UTC) < RUN_AT_MAX
        except OverflowError:
            in_range = False
        if not in_range:
            raise InvalidJob("run_at", "must be after 0001-01-01 and before 9999-12-31 (UTC)")
    if job.idempotency_key is not None:
        check_idempotency_key(job.idempotency_key)
    if job.concurrency_key is not None:
        check_concurrency_key(job.concurrency_key)
    if job.trace_context is not None:
        _check_trace_context(job.trace_context)
    if run_at is job.run_at:
        return job
    # The constructor, not dataclasses.replace: this runs once per job of a bulk enqueue.
    return NewJob(
        job.kind,
        job.payload,
        job.queue,
        job.priority,
        max_attempts,
        run_at,
        job.idempotency_key,
        job.concurrency_key,
        job.trace_context,
    )


def fingerprint(job: NewJob) -> str:
    """What makes two requests "the same" for idempotency: everything that defines the job."""
    canonical = orjson.dumps(
        {
            "kind": job.kind,
            "payload": job.payload,
            "queue": job.queue,
            "priority": job.priority,
            "max_attempts": job.max_attempts,
            # One instant, one fingerprint, whatever UTC offset the client wrote it in.
            "run_at": job.run_at.astimezone(UTC).isoformat() if job.run_at else None,
            # Only when set: fingerprints of requests without one stay what they were.
            **({"concurrency_key": job.concurrency_key} if job.concurrency_key else {}),
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


def clamp_limit(limit: int | None) -> int:
    if limit is None:
        return LIST_LIMIT_DEFAULT
    return max(1, min(LIST_LIMIT_MAX, limit))
