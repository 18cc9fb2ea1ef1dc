"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import operator
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal, Union

import orjson
import pydantic
from pydantic import BaseModel, ConfigDict, Field

from jobq import wire
from jobq.queue import (
    DEFAULT_QUEUE,
    MAX_ATTEMPTS_MAX,
    MAX_ATTEMPTS_MIN,
    MAX_CONCURRENCY_KEY_LENGTH,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_NAME_LENGTH,
    PRIORITY_MAX,
    PRIORITY_MIN,
    STATUSES,
    Job,
    JobSummary,
)
from jobq.queue.inserts import Row
from jobq.queue.unique import MAX_UNIQUE_BY, MAX_UNIQUE_FOR
from jobq.registry import Registry

# Printable characters only; the pattern states the part JSON Schema can: no C0/C1 controls.
Name = Annotated[
    str, Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$")
]


def _integral(value: Any) -> Any:
    """JSON has one number type: 3.0 is the integer 3 (JSON Schema agrees); 3.5 is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _rfc3339(value: Any) -> Any:
    if isinstance(value, datetime):
        return value  # from Python, not JSON
    if not isinstance(value, str):
        raise ValueError(f"must be {wire.RFC3339_HINT}")
    try:
        return wire.parse_rfc3339(value)
    except wire.WireError as exc:
        raise ValueError(exc.message) from None


class JobCreate(BaseModel):
    """A job to enqueue."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Name = Field(description="Which handler runs the job.")
    payload: dict[str, Any] = Field(
        default_factory=dict, description="JSON object handed to the handler."
    )
    queue: Name = Field(default=DEFAULT_QUEUE)
    priority: int = Field(
        default=0, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="Lower runs first."
    )
    max_attempts: int | None = Field(
        default=None,
        ge=MAX_ATTEMPTS_MIN,
        le=MAX_ATTEMPTS_MAX,
        description="Attempts before the job fails permanently. Not given: the handler's "
        "max_attempts (or JOBQ_DEFAULT_MAX_ATTEMPTS), fixed when a worker first claims the job.",
    )
    run_at: (
        Annotated[
            datetime,
            pydantic.BeforeValidator(_rfc3339),
            pydantic.WithJsonSchema(
                {"type": "string", "format": "date-time", "pattern": wire.RFC3339_PATTERN}
            ),
        ]
        | None
    ) = Field(
        default=None,
        description="When the job becomes due; default now. An RFC 3339 date-time with an"
        " offset (`Z` or `+hh:mm`), at most microsecond precision, years 1-9999 in UTC. Nothing"
        " else is accepted: no time without an offset, no bare date, no Unix time.",
    )
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_IDEMPOTENCY_KEY_LENGTH,
        pattern=r"^[ -~]+$",
        description="Same as the Idempotency-Key header (printable ASCII); the header wins.",
    )
    concurrency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CONCURRENCY_KEY_LENGTH,
        pattern=r"^[^\x00-\x1f\x7f-\x9f]+$",
        description="The tenant, customer or account the job belongs to: per-key concurrency"
        " limits and fair share group jobs by it. Not given: the key the kind's (or queue's)"
        " declared payload field holds, or the handler's function of the payload when the"
        " server knows the handler; else none. A key that differs from the one the handler"
        " derives is a 422 problem (`key_conflict`).",
    )
    unique_for: float | None = Field(
        default=None,
        ge=0.001,
        le=MAX_UNIQUE_FOR.total_seconds(),
        description="Seconds: a unique job. While a job of the same kind, queue and"
        " `unique_by` payload fields was enqueued within this period and is in one of"
        " `unique_states`, no job is created and that job is returned with 200 and"
        " `Jobq-Unique: duplicate`. Not with an idempotency key.",
    )
    unique_by: list[Name] | None = Field(
        default=None,
        max_length=MAX_UNIQUE_BY,
        description="The payload fields (top level) that make two jobs the same, besides kind"
        " and queue; a field the payload lacks counts as null. Default: the whole payload.",
    )
    unique_states: list[Literal[STATUSES]] | None = Field(  # type: ignore[valid-type]
        default=None,
        min_length=1,
        description="The states of the earlier job that make a duplicate. Default: queued,"
        " running, retrying, succeeded (not failed_permanent or cancelled).",
    )

    # Strict otherwise: "3" and true are not integers.
    _integral_numbers = pydantic.field_validator("priority", "max_attempts", mode="before")(
        _integral
    )

    @pydantic.field_validator("unique_for", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        # Strict mode takes no int for a float field; a JSON number of seconds is either.
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value


class JobError(BaseModel):
    attempt: int
    error: str
    at: datetime


class JobProgress(BaseModel):
    """What the handler last reported with `ctx.progress`."""

    fraction: float = Field(ge=0, le=1, description="How far the job is, from 0 to 1.")
    message: str | None
    attempt: int = Field(description="The attempt that reported it.")
    updated_at: datetime


class JobOut(BaseModel):
    """A job and everything known about its runs."""

    id: uuid.UUID
    kind: str
    queue: str
    status: Literal["queued", "running", "retrying", "succeeded", "failed_permanent", "cancelled"]
    payload: dict[str, Any]
    result: Any = Field(description="The handler's return value, once succeeded.")
    priority: int
    attempts: int
    max_attempts: int | None = Field(
        description="null until a worker first claims a job enqueued without max_attempts: "
        "then the handler's value (or JOBQ_DEFAULT_MAX_ATTEMPTS)."
    )
    last_error: str | None
    errors: list[JobError] = Field(
        description="The latest failed attempts (at most 20), oldest first."
    )
    idempotency_key: str | None
    cancel_requested: bool
    run_at: datetime
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    concurrency_key: str | None
    progress: JobProgress | None = Field(
        description="The latest progress its handler reported; null when it reported none."
    )


class JobBatchItemOut(JobOut):
    created: bool = Field(
        description="true: this request created the job; false: an idempotent replay, the job"
        " its idempotency_key made before."
    )


class JobBatchOut(BaseModel):
    jobs: list[JobBatchItemOut] = Field(description="The jobs, in request order.")


class JobSummaryOut(BaseModel):
    """A job in a list: everything but `payload`, `result` and `errors`, which can be large.
    `GET /jobs/{job_id}` returns the whole job."""

    id: uuid.UUID
    kind: str
    queue: str
    status: Literal["queued", "running", "retrying", "succeeded", "failed_permanent", "cancelled"]
    priority: int
    attempts: int
    max_attempts: int | None = Field(
        description="null until a worker first claims a job enqueued without max_attempts."
    )
    last_error: str | None = Field(description="The latest failure's message.")
    idempotency_key: str | None
    cancel_requested: bool
    run_at: datetime
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobPage(BaseModel):
    jobs: list[JobSummaryOut] = Field(
        description="Summaries, newest first: no payload, result or errors."
    )
    limit: int
    offset: int
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; stable under concurrent inserts."
    )


class CancelOut(BaseModel):
    status: Literal["cancelled", "pending"]
    job_id: uuid.UUID


class Health(BaseModel):
    status: Literal["ok", "unavailable"]


_OUT_FIELDS = tuple(JobOut.model_fields)
_out_values = operator.attrgetter(*_OUT_FIELDS)


def job_to_dict(job: Job) -> dict[str, Any]:
    """The JSON shape of `JobOut`, without a validation pass on every response."""
    out = dict(zip(_OUT_FIELDS, _out_values(job), strict=True))
    out["id"] = str(job.id)  # asyncpg's UUID type is not one orjson knows
    return out


_JSON_OUT_FIELDS = ("payload", "result", "errors", "progress")


def job_row_to_dict(row: Row) -> dict[str, Any]:
    """`job_to_dict` of a job as the queue core read it back (`Queue.enqueue_job_rows`): its
    jsonb columns, text already, go into the answer as they are (`orjson.Fragment`), not
    decoded to be encoded again."""
    out = {f: row[f] for f in _OUT_FIELDS}
    for f in _JSON_OUT_FIELDS:
        if out[f] is not None:
            out[f] = orjson.Fragment(out[f])
    out["id"] = str(out["id"])
    return out


_SUMMARY_OUT_FIELDS = tuple(JobSummaryOut.model_fields)


def summary_to_dict(job: JobSummary) -> dict[str, Any]:
    """The JSON shape of `JobSummaryOut`."""
    out = {f: getattr(job, f) for f in _SUMMARY_OUT_FIELDS}
    out["id"] = str(job.id)
    return out


def create_body_schema(registry: Registry | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The request-body schema of POST /jobs and the component schemas it refers to.

    With a registry, a union over the known kinds, each with its payload schema.
    """
    ref = "#/components/schemas/{model}"
    if registry is None or not len(registry):
        schema = JobCreate.model_json_schema(ref_template=ref)
        defs = schema.pop("$defs", {})
        return {"$ref": "#/components/schemas/JobCreate"}, {"JobCreate": schema, **defs}
    variants: list[type[BaseModel]] = []
    for handler in registry:
        payload_type: Any = handler.payload_model or dict[str, Any]
        kind_type: Any = Literal[handler.kind]
        name = "JobCreate_" + "".join(c if c.isalnum() else "_" for c in handler.kind)
        model = handler.payload_model
        # `{}` is the default payload only where the kind's payload has no required field.
        payload_field = (
            Field(description="Required: this kind's payload has required fields.")
            if model is not None and any(f.is_required() for f in model.model_fields.values())
            else Field(default_factory=dict)
        )
        variants.append(
            pydantic.create_model(
                name,
                __base__=JobCreate,
                kind=(kind_type, Field(description="Which handler runs the job.")),
                payload=(payload_type, payload_field),
            )
        )
    body: Any = variants[0]
    if len(variants) > 1:
        body = Annotated[Union[tuple(variants)], Field(discriminator="kind")]  # noqa: UP007
    schema = pydantic.TypeAdapter(body).json_schema(ref_template=ref)
    defs = schema.pop("$defs", {})
    return schema, defs


def batch_body(job: dict[str, Any], batch_max: int) -> dict[str, Any]:
    """The request body of POST /jobs/batch: `{"jobs": [...]}`, each job as POST /jobs takes."""
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"jobs": {"type": "array", "items": job, "maxItems": batch_max}},
                    "required": ["jobs"],
                    "additionalProperties": False,
                },
                "examples": {
                    "two jobs": {
                        "summary": "Two jobs, one with an idempotency key",
                        "value": {
                            "jobs": [
                                {"kind": "echo", "payload": {"hello": "world"},
                                 "idempotency_key": "order-42"},
                                {"kind": "sleep", "payload": {"seconds": 1}, "queue": "default",
                                 "priority": 5},
                            ]
                        },
                    }
                },
            }
        },
    }  # fmt: skip


# -- GET /stats ----------------------------------------------------------------------------


class StatusCounts(BaseModel):
    queued: int
    running: int
    retrying: int
    succeeded: int
    failed_permanent: int
    cancelled: int


class QueueStats(BaseModel):
    queue: str
    counts: StatusCounts = Field(description="Jobs in this queue by status.")
    total: int
    oldest_due_at: datetime | None = Field(
        description="When the longest-waiting due job (queued or retrying) became due."
    )
    oldest_due_age_seconds: float | None = Field(
        description="How long that job has been waiting; null when nothing due is waiting."
    )
    paused: bool = Field(description="No worker claims this queue's jobs until it is resumed.")
    paused_by: str | None = Field(default=None, description="Who paused it, if the pause said.")


class MinuteStats(BaseModel):
    minute: datetime = Field(description="Start of the minute (UTC).")
    succeeded: int
    failed_permanent: int
    cancelled: int


class FailingKind(BaseModel):
    kind: str
    failed_permanent: int = Field(description="Jobs of this kind that failed for good lately.")
    retrying: int = Field(description="Jobs of this kind waiting to retry after a failure.")
    last_error: str | None
    last_job_id: uuid.UUID
    last_failed_at: datetime


class UnhandledKind(BaseModel):
    queue: str
    kind: str
    count: int = Field(description="Waiting jobs of this kind and queue no live worker takes.")
    oldest_created_at: datetime = Field(
        description="When the first of them in line (or the oldest waiting to retry) was created."
    )


class WorkerStats(BaseModel):
    worker_id: str
    kinds: list[str]
    queues: list[str]
    concurrency: int
    started_at: datetime
    last_seen_at: datetime


class KeyUsage(BaseModel):
    key: str
    running: int


class LimitStats(BaseModel):
    """A limited queue or kind: what runs under its limits now."""

    scope: Literal["queue", "kind"]
    name: str
    running: int = Field(description="Its jobs running now, on every worker.")
    max_concurrency: int | None
    max_per_key: int | None
    rate_per_second: float | None
    burst: float | None
    tokens: float | None = Field(description="Starts the rate limit allows at once now.")
    fair: bool
    keys: list[KeyUsage] = Field(description="Keys with running jobs, most first (at most 20).")


class ScheduleStats(BaseModel):
    name: str
    kind: str
    queue: str
    spec: str = Field(description="`cron <expression> (<time zone>)` or `every <seconds>s`.")
    next_run_at: datetime | None = Field(description="The next tick the scheduler will enqueue.")
    last_run_at: datetime | None = Field(
        description="The tick of the latest job enqueued; null before the first."
    )
    last_job_id: uuid.UUID | None
    declared_at: datetime = Field(
        description="When a worker last declared the schedule: each one running it does so"
        " every 15 s; a schedule no worker declared for 60 s (removed from the code, or no"
        " worker running) is not listed."
    )


class StatsOut(BaseModel):
    """The queue at a glance."""

    generated_at: datetime
    paused_kinds: list[str] = Field(description="Kinds no worker claims until resumed.")
    limits: list[LimitStats] = Field(description="Running jobs against each limit.")
    window_minutes: int = Field(description="The span of `finished_per_minute`.")
    queues: list[QueueStats] = Field(
        description="Every queue with jobs, a pause or a limit, by name: those GET /queues lists."
    )
    finished_per_minute: list[MinuteStats] = Field(
        description="Jobs that ended in each minute of the window, oldest first, current last."
    )
    failing_kinds: list[FailingKind] = Field(
        description="Kinds with the most failures in the window (failed for good or retrying)."
    )
    unhandled: list[UnhandledKind] = Field(
        description="Waiting jobs whose kind and queue no live worker handles."
    )
    workers: list[WorkerStats] = Field(description="Live workers and what they handle.")
    schedules: list[ScheduleStats] = Field(
        description="Periodic schedules the workers declare, by name, with their next run."
    )


# -- flow control: GET /queues, pause and resume --------------------------------------------


class FlowStateOut(BaseModel):
    """A queue's or kind's pause and limits."""

    name: str
    paused: bool = Field(description="No worker claims its jobs; running ones finish.")
    paused_at: datetime | None
    paused_by: str | None = Field(
        default=None, description='Who paused it, as the pause said (`{"by": ...}`), if it did.'
    )
    max_concurrency: int | None = Field(description="Running jobs at most, all workers together.")
    max_per_key: int | None = Field(description="Running jobs per concurrency key at most.")
    rate_per_second: float | None = Field(description="Jobs started per second at most.")
    burst: float | None = Field(description="Starts allowed at once after a quiet spell.")
    fair: bool = Field(description="Claims take concurrency keys in turn.")


class QueueOut(FlowStateOut):
    counts: StatusCounts = Field(description="Jobs in this queue by status.")
    total: int


class QueuesOut(BaseModel):
    queues: list[QueueOut] = Field(
        description="Every queue with jobs, a pause or a limit, by name. A queue can be paused"
        " before it has jobs."
    )
    kinds: list[FlowStateOut] = Field(description="Every kind paused or limited, by name.")


def flow_state_to_dict(state: Any) -> dict[str, Any]:
    return {
        "name": state.name,
        "paused": state.paused,
        "paused_at": state.paused_at,
        "paused_by": state.paused_by,
        "max_concurrency": state.max_concurrency,
        "max_per_key": state.max_per_key,
        "rate_per_second": state.rate,
        "burst": state.burst,
        "fair": state.fair,
    }
