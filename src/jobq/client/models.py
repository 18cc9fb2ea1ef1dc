"""What the client returns: the API's response bodies (`jobq.api.schemas`) as dataclasses.

Plain dataclasses parsed by hand, so that the client needs neither pydantic nor the server's
packages; tests/test_client.py checks that their fields are the schemas' fields. Fields the
API adds later are ignored, so an older client keeps working against a newer API.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

Status = Literal["queued", "running", "retrying", "succeeded", "failed_permanent", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed_permanent", "cancelled"})


def _time(value: Any) -> datetime:
    return datetime.fromisoformat(value)


def _maybe_time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True, slots=True)
class JobError:
    """One failed attempt."""

    attempt: int
    error: str
    at: datetime


@dataclass(frozen=True, slots=True)
class Job:
    """A job and everything known about its runs (`GET /jobs/{id}`)."""

    id: uuid.UUID
    kind: str
    queue: str
    status: Status
    payload: dict[str, Any]
    result: Any
    priority: int
    attempts: int
    max_attempts: int | None
    last_error: str | None
    errors: list[JobError]
    idempotency_key: str | None
    cancel_requested: bool
    run_at: datetime
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # The tenant or account it belongs to, for per-key limits and fair share.
    concurrency_key: str | None = None
    # What its handler last reported: fraction, message, attempt, updated_at (as JSON).
    progress: dict[str, Any] | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Job:
        return cls(
            **_summary_fields(d),
            payload=d["payload"],
            result=d.get("result"),
            errors=[JobError(e["attempt"], e["error"], _time(e["at"])) for e in d["errors"]],
            concurrency_key=d.get("concurrency_key"),
            progress=d.get("progress"),
        )


@dataclass(frozen=True, slots=True)
class JobSummary:
    """A job in a list: no payload, result or errors (`get` has them)."""

    id: uuid.UUID
    kind: str
    queue: str
    status: Status
    priority: int
    attempts: int
    max_attempts: int | None
    last_error: str | None
    idempotency_key: str | None
    cancel_requested: bool
    run_at: datetime
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> JobSummary:
        return cls(**_summary_fields(d))


def _summary_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a job has in a list and in full alike (`JobSummary`'s), read from JSON."""
    return {
        "id": uuid.UUID(d["id"]),
        "kind": d["kind"],
        "queue": d["queue"],
        "status": d["status"],
        "priority": d["priority"],
        "attempts": d["attempts"],
        "max_attempts": d.get("max_attempts"),
        "last_error": d.get("last_error"),
        "idempotency_key": d.get("idempotency_key"),
        "cancel_requested": d["cancel_requested"],
        "run_at": _time(d["run_at"]),
        "created_at": _time(d["created_at"]),
        "updated_at": _time(d["updated_at"]),
        "started_at": _maybe_time(d.get("started_at")),
        "finished_at": _maybe_time(d.get("finished_at")),
    }


@dataclass(frozen=True, slots=True)
class Page:
    """One page of `GET /jobs`; `next_cursor` fetches the next (None: this was the last)."""

    jobs: list[JobSummary]
    limit: int
    offset: int
    next_cursor: str | None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Page:
        return cls(
            jobs=[JobSummary.from_json(j) for j in d["jobs"]],
            limit=d["limit"],
            offset=d["offset"],
            next_cursor=d.get("next_cursor"),
        )


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The job an enqueue stored, or (`created` False) the one its idempotency key had."""

    job: Job
    created: bool


@dataclass(frozen=True, slots=True)
class Cancelled:
    """`cancelled`: the job had not started and is cancelled; `pending`: it runs, and its
    handler was asked to stop."""

    status: Literal["cancelled", "pending"]
    job_id: uuid.UUID

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Cancelled:
        return cls(status=d["status"], job_id=uuid.UUID(d["job_id"]))


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to enqueue, for `enqueue_batch` (`enqueue` takes the same as arguments). Fields
    left None are not sent: the API's defaults apply."""

    kind: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    max_attempts: int | None = None
    run_at: datetime | None = None
    idempotency_key: str | None = None
    concurrency_key: str | None = None
    # A unique job (see `POST /jobs`): seconds or a timedelta; payload fields; states.
    unique_for: float | timedelta | None = None
    unique_by: Sequence[str] | None = None
    unique_states: Sequence[str] | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": self.kind, "payload": dict(self.payload)}
        for name in ("queue", "priority", "max_attempts", "idempotency_key", "concurrency_key"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        if self.run_at is not None:
            body["run_at"] = self.run_at.isoformat()
        if self.unique_for is not None:
            period = self.unique_for
            body["unique_for"] = period.total_seconds() if isinstance(period, timedelta) else period
        for name in ("unique_by", "unique_states"):
            names = getattr(self, name)
            if names is not None:
                body[name] = list(names)
        return body
