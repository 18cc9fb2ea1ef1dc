"""Job routes: parse and check the request, call the queue core, shape the response."""

from __future__ import annotations

import asyncio
import re
import typing
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Any, Literal, TypeVar

import orjson
import pydantic
from fastapi import APIRouter, Depends, Header, Path, Query, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from jobq import metrics, wire
from jobq.api.auth import require_token
from jobq.api.problems import COMMON_RESPONSES, ProblemError, openapi_problem
from jobq.api.schemas import (
    CancelOut,
    JobCreate,
    JobOut,
    JobPage,
    job_to_dict,
    summary_to_dict,
)
from jobq.api.server import ON_DISCONNECT
from jobq.queue import (
    MAX_NAME_LENGTH,
    MAX_OFFSET,
    STATUSES,
    CancelOutcome,
    NewJob,
    Queue,
    check_idempotency_key,
    clamp_limit,
)
from jobq.registry import Handler, KeyConflict, KeyUnusable, PayloadInvalid, Registry

T = TypeVar("T")

JSON = "application/json"
# Printable ASCII, or a quoted string; optional whitespace around it is trimmed (RFC 9110 5.5).
# Kinds and queues never hold control characters (Postgres text cannot hold NUL at all).
NO_CONTROL_CHARS = r"^[^\x00-\x1f\x7f]*$"
IDEMPOTENCY_HEADER_PATTERN = r'^[ \t]*(?:"[ -~]{1,255}"|[!-~](?:[ -~]{0,253}[!-~])?)[ \t]*$'


async def strict_query(request: Request) -> None:
    """Unknown or repeated query parameters are 422, naming the parameter: `?Status=` or a
    second `status=` must not silently fall back to an unfiltered list or the last value."""
    route = request.scope.get("route")
    known = _query_names(route)
    seen: set[str] = set()
    errors = []
    for name, value in request.query_params.multi_items():
        if name not in known:
            hint = f"known: {', '.join(sorted(known))}" if known else "this route takes none"
            errors.append(
                {"loc": ["query", name], "msg": f"unknown parameter; {hint}",
                 "type": "unknown_parameter"}
            )  # fmt: skip
        elif name in seen:
            errors.append(
                {"loc": ["query", name], "msg": "given more than once",
                 "type": "repeated_parameter"}
            )  # fmt: skip
        elif (shape := _numeric_query(route).get(name)) is not None and not shape.fullmatch(value):
            # The validator would read "1_0" as 10 and " 1" as 1: a number is written plainly.
            errors.append(
                {"loc": ["query", name], "msg": "must be a number written in decimal digits",
                 "type": "number_format"}
            )  # fmt: skip
        seen.add(name)
    if errors:
        names = ", ".join(dict.fromkeys(str(e["loc"][1])[:40] for e in errors))
        raise ProblemError(
            422, "validation_error", f"unknown or repeated query parameter: {names}", errors=errors
        )


def _query_names(route: Any) -> frozenset[str]:
    # Cached on the route itself (routes compare by value, so they cannot key a dict).
    names: frozenset[str] | None = getattr(route, "_jobq_query_names", None)
    if names is None:
        names = frozenset(_declared_query(getattr(route, "dependant", None)))
        if route is not None:
            route._jobq_query_names = names
    return names


_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def _numeric_query(route: Any) -> dict[str, re.Pattern[str]]:
    """The route's integer and float query parameters, each with the shape its value takes."""
    shapes: dict[str, re.Pattern[str]] | None = getattr(route, "_jobq_numeric_query", None)
    if shapes is None:
        shapes = {}
        for param in _declared_params(getattr(route, "dependant", None)):
            args = typing.get_args(param.field_info.annotation) or (param.field_info.annotation,)
            if int in args:
                shapes[str(param.alias)] = _INTEGER
            elif float in args:
                shapes[str(param.alias)] = _DECIMAL
        if route is not None:
            route._jobq_numeric_query = shapes
    return shapes


def _declared_params(dependant: Any) -> list[Any]:
    if dependant is None:
        return []
    params = list(dependant.query_params)
    for sub in dependant.dependencies:
        params += _declared_params(sub)
    return params


def _declared_query(dependant: Any) -> set[str]:
    """The query parameters a route and its dependencies declare."""
    return {str(p.alias) for p in _declared_params(dependant)}


router = APIRouter(dependencies=[Depends(require_token), Depends(strict_query)], tags=["jobs"])

_BAD_ID: dict[int | str, dict[str, Any]] = {422: openapi_problem("The job id is not a UUID.")}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: openapi_problem("No job with this id.")}


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON)


def queue_of(request: Request) -> Queue:
    queue: Queue = request.app.state.queue
    return queue


def _read_queue(request: Request) -> Queue:
    """The read replica (JOBQ_READ_DATABASE_URL) when there is one: for reads that tolerate lag."""
    queue: Queue = request.app.state.read_queue
    return queue


def _media_type(header: str) -> tuple[str, dict[str, str]]:
    """`type/subtype` and its parameters (names lower-cased, quotes removed)."""
    kind, *params = header.split(";")
    parsed = {}
    for param in params:
        name, _, value = param.partition("=")
        parsed[name.strip().lower()] = value.strip().strip('"')
    return kind.strip().lower(), parsed


def _check_body_encoding(request: Request) -> None:
    """JSON, UTF-8, not compressed: what the body must be before it is read (else 415)."""
    ctype, params = _media_type(request.headers.get("content-type", ""))
    if ctype != JSON and not (ctype.startswith("application/") and ctype.endswith("+json")):
        raise ProblemError(415, "unsupported_media_type", "the body must be application/json")
    charset = params.get("charset")
    if charset is not None and charset.lower() != "utf-8":
        raise ProblemError(
            415,
            "unsupported_media_type",
            f"charset {charset[:40]!r} is not supported: the body must be UTF-8",
        )
    codings = [
        c.strip().lower()
        for c in request.headers.get("content-encoding", "").split(",")
        if c.strip().lower() not in {"", "identity"}
    ]
    if codings:
        raise ProblemError(
            415,
            "unsupported_media_type",
            f"Content-Encoding {', '.join(codings)[:60]!r} is not supported: send the body"
            " uncompressed",
            headers={"Accept-Encoding": "identity"},
        )


async def read_json_body(request: Request, limit: int | None = None) -> Any:
    """The request body as JSON: size-limited (JOBQ_MAX_PAYLOAD_BYTES unless `limit`), type,
    charset and coding checked, strictly parsed (see jobq.wire: no duplicate keys, no number
    that would be rounded)."""
    _check_body_encoding(request)
    if limit is None:
        limit = request.app.state.settings.max_payload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProblemError(413, "payload_too_large", f"the body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProblemError(413, "payload_too_large", f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    try:
        return wire.loads(b"".join(chunks))
    except wire.WireError as exc:
        raise ProblemError(
            422,
            exc.error,
            exc.message,
            errors=[{"loc": ["body"], "msg": exc.message, "type": exc.error}],
        ) from None


def _field_errors(exc: pydantic.ValidationError, prefix: str = "body") -> list[dict[str, Any]]:
    return [
        {"loc": [prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


def _job_key(handler: Handler, payload: dict[str, Any], given: str | None) -> str | None:
    """The job's concurrency key (Handler.job_key); a derived value that is no key is
    reported at the payload field it came from (at the payload, from a function), the field
    the client sent."""
    try:
        return handler.job_key(payload, given)
    except KeyConflict as exc:
        # A key given that the handler would not give puts the job under another tenant's
        # limits: refused, not silently preferred (docs/flow-control.md).
        raise ProblemError(
            422,
            "validation_error",
            f"`concurrency_key` {exc.message}; omit it or give the same",
            errors=[{"loc": ["body", "concurrency_key"], "msg": exc.message,
                     "type": "key_conflict"}],
        ) from None  # fmt: skip
    except KeyUnusable as exc:
        where = ".".join(("payload", *exc.path))
        raise ProblemError(
            422,
            "validation_error",
            f"{where}: the concurrency key derived from it {exc.message}",
            errors=[{"loc": ["body", "payload", *exc.path], "msg": exc.message,
                     "type": "invalid_concurrency_key"}],
        ) from None  # fmt: skip


def new_job(
    body: Any,
    header_key: str | None,
    registry: Registry | None,
    *,
    unique: dict[str, Any] | None = None,
) -> NewJob:
    """The job a body asks for. Its `unique_*` options (of `Queue.enqueue`) go into `unique`;
    a caller that passes none (a batch) refuses them rather than drop them."""
    if not isinstance(body, dict):
        raise ProblemError(422, "validation_error", "the body must be a JSON object")
    try:
        req = JobCreate.model_validate(body)
    except pydantic.ValidationError as exc:
        raise ProblemError(
            422, "validation_error", "the job is invalid", errors=_field_errors(exc)
        ) from None
    return job_of(req, header_key, registry, unique=unique)


def job_of(
    req: JobCreate,
    header_key: str | None,
    registry: Registry | None,
    *,
    unique: dict[str, Any] | None = None,
) -> NewJob:
    """`new_job` of a body already validated as a `JobCreate`: the registry's checks and
    defaults, the idempotency key, the unique options."""
    max_attempts = req.max_attempts
    concurrency_key = req.concurrency_key
    kind_unique = None
    if registry is not None:
        if req.kind not in registry:
            raise ProblemError(
                422,
                "unknown_kind",
                f"no handler for kind {req.kind!r}; known kinds: {', '.join(registry.kinds)}",
                errors=[{"loc": ["body", "kind"], "msg": "unknown kind", "type": "unknown_kind"}],
            )
        handler = registry[req.kind]
        try:
            handler.parse_payload(req.payload)
        except PayloadInvalid as exc:
            errors = [
                {"loc": ["body", "payload", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors
            ]
            raise ProblemError(
                422, "invalid_payload", f"the payload does not fit {req.kind!r}", errors=errors
            ) from None
        if max_attempts is None:
            max_attempts = handler.max_attempts
        kind_unique = handler.unique
        concurrency_key = _job_key(handler, req.payload, concurrency_key)
    key = req.idempotency_key
    if header_key is not None:
        key = header_key.strip(" \t")
        if len(key) >= 3 and key[0] == key[-1] == '"':
            key = key[1:-1]  # the draft's examples quote the value
    if key is not None:
        check_idempotency_key(key)
    new = NewJob(
        kind=req.kind,
        payload=req.payload,
        queue=req.queue,
        priority=req.priority,
        max_attempts=max_attempts,
        run_at=req.run_at,
        idempotency_key=key,
        concurrency_key=concurrency_key,
    )
    if req.unique_for is not None or req.unique_by is not None or req.unique_states is not None:
        if unique is None:
            raise ProblemError(
                422, "validation_error", "unique jobs are enqueued one at a time (POST /jobs)",
                errors=[{"loc": ["body", "unique_for"], "msg": "not in a batch",
                         "type": "value_error"}],
            )  # fmt: skip
        unique.update(
            unique_for=None if req.unique_for is None else timedelta(seconds=req.unique_for),
            unique_by=req.unique_by,
            unique_states=req.unique_states,
        )
    elif kind_unique is not None and key is None:
        # The handler's own unique options: every enqueue of the kind is unique.
        if unique is None:
            raise ProblemError(
                422, "validation_error",
                f"jobs of kind {req.kind!r} are unique (its handler declares unique_for): enqueue"
                " them one at a time (POST /jobs)",
                errors=[{"loc": ["body", "unique_for"], "type": "value_error",
                         "msg": "not in a batch: the kind's handler declares unique_for"}],
            )  # fmt: skip
        unique.update(
            unique_for=kind_unique.period,
            unique_by=kind_unique.by,
            unique_states=kind_unique.states,
        )
    return new


@router.post(
    "/jobs",
    status_code=201,
    summary="Enqueue a job",
    response_model=None,
    responses={
        201: {"model": JobOut, "description": "Created."},
        200: {
            "model": JobOut,
            "description": "Idempotent replay: the job this key created; or, for a unique job"
            " (`unique_for`), the existing job it duplicates, with `Jobq-Unique: duplicate`.",
            "headers": {
                "Jobq-Unique": {
                    "description": "For a unique job: `created` (201) or `duplicate` (200).",
                    "schema": {"type": "string", "enum": ["created", "duplicate"]},
                }
            },
        },
        413: openapi_problem("The body is larger than JOBQ_MAX_PAYLOAD_BYTES."),
        415: openapi_problem(
            "The body is not `application/json`, names a charset other than UTF-8, or has a"
            " Content-Encoding other than identity (compressed bodies are not accepted)."
        ),
        422: openapi_problem(
            "Invalid job, unknown kind, payload that does not fit the kind, or an "
            "Idempotency-Key reused with a different request."
        ),
        **COMMON_RESPONSES,
    },
    openapi_extra={"x-jobq-request-body": True},
)
async def enqueue(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Makes retries of this request safe: 1-255 printable ASCII characters,"
            " optionally in double quotes; spaces and tabs around the value are trimmed. A key"
            " is remembered for at least JOBQ_IDEMPOTENCY_WINDOW (default 24h) after its job"
            " was created, and as long as the job exists; after that it may be used again.",
            pattern=IDEMPOTENCY_HEADER_PATTERN,
        ),
    ] = None,
) -> Response:
    body = await read_json_body(request)
    unique: dict[str, Any] = {}
    new = new_job(body, idempotency_key, request.app.state.registry, unique=unique)
    result = await queue_of(request).enqueue(new, **unique)
    if result.created:
        registry = request.app.state.registry
        metrics.JOBS_ENQUEUED.labels(metrics.kind_label(result.job.kind, registry)).inc()
    response = json_response(job_to_dict(result.job), 201 if result.created else 200)
    if unique:
        response.headers["Jobq-Unique"] = "created" if result.created else "duplicate"
    return response


@router.get(
    "/jobs",
    summary="List jobs, newest first",
    description="Each job as a summary, without `payload`, `result` and `errors` (which can be"
    " large): `GET /jobs/{job_id}` returns the whole job. Filters combine with AND; each query"
    " parameter may be given once.",
    response_model=JobPage,
    responses={
        422: openapi_problem(
            "Invalid, unknown or repeated filter or paging parameter, offset over"
            f" {MAX_OFFSET}, or a cursor this API did not issue (the error names the parameter)."
        ),
        **COMMON_RESPONSES,
    },
)
async def list_jobs(
    request: Request,
    status: Annotated[
        str | None,
        Query(
            description=f"One of: {', '.join(STATUSES)}.",
            json_schema_extra={"enum": list(STATUSES)},
        ),
    ] = None,
    kind: Annotated[str | None, Query(max_length=MAX_NAME_LENGTH, pattern=NO_CONTROL_CHARS)] = None,
    queue: Annotated[
        str | None, Query(max_length=MAX_NAME_LENGTH, pattern=NO_CONTROL_CHARS)
    ] = None,
    limit: Annotated[int, Query(description="Page size; clamped to 1..200.")] = 50,
    offset: Annotated[
        int,
        Query(
            ge=0,
            le=MAX_OFFSET,
            description=f"Rows to skip, at most {MAX_OFFSET}: page deeper with `cursor`.",
        ),
    ] = 0,
    cursor: Annotated[
        str | None,
        Query(
            max_length=512,
            pattern=r"^[A-Za-z0-9_-]+$",
            description="`next_cursor` of the previous page (opaque).",
        ),
    ] = None,
) -> Response:
    if status is not None and status not in STATUSES:
        raise ProblemError(
            422,
            "validation_error",
            f"unknown status {status!r}; one of: {', '.join(STATUSES)}",
            errors=[{"loc": ["query", "status"], "msg": "unknown status", "type": "enum"}],
        )
    page = await _read_queue(request).list_summaries(
        status=status, kind=kind, queue=queue, limit=limit, offset=offset, cursor=cursor
    )
    return json_response(
        {
            "jobs": [summary_to_dict(j) for j in page.jobs],
            "limit": clamp_limit(limit),
            "offset": offset,
            "next_cursor": page.next_cursor,
        }
    )


JobId = Annotated[uuid.UUID, Path(description="The job's id (a UUID).")]


@router.get(
    "/jobs/{job_id}",
    summary="Get a job, or wait for it to end",
    description="With `wait=SECONDS` (0 to JOBQ_WAIT_MAX_SECONDS, default at most 60), the"
    " answer comes as soon as the job has ended (succeeded, failed_permanent or cancelled), or"
    " with the job as it is when the wait is over: look at `status`. With `until=progress`, also"
    " as soon as its progress changes. Waits cost no database connection of their own: one"
    " API process serves every waiter with one LISTEN connection.",
    response_model=JobOut,
    responses={
        422: openapi_problem(
            "The job id is not a UUID, `wait` is not a number from 0 to JOBQ_WAIT_MAX_SECONDS,"
            " or `until` is given without `wait` or is not `end` or `progress`."
        ),
        **_NOT_FOUND,
        **COMMON_RESPONSES,
    },
)
async def get_job(
    request: Request,
    job_id: JobId,
    wait: Annotated[
        float | None,
        Query(
            ge=0,
            allow_inf_nan=False,
            description="Seconds to wait for the job to end (at most JOBQ_WAIT_MAX_SECONDS,"
            " default 60).",
        ),
    ] = None,
    until: Annotated[
        Literal["end", "progress"] | None,
        Query(
            description="With `wait`: `end` (default) answers when the job ends; `progress`"
            " also when its progress changes."
        ),
    ] = None,
) -> Response:
    queue = queue_of(request)
    if wait is None:
        if until is not None:
            raise ProblemError(
                422,
                "validation_error",
                "until is only meaningful with wait",
                errors=[{"loc": ["query", "until"], "msg": "given without wait",
                         "type": "missing_wait"}],
            )  # fmt: skip
        return json_response(job_to_dict(await queue.get(job_id)))
    most: float = request.app.state.settings.wait_max_seconds
    if wait > most:
        raise ProblemError(
            422,
            "validation_error",
            f"wait must be at most {most:g} seconds (JOBQ_WAIT_MAX_SECONDS); ask again to wait"
            " longer",
            errors=[{"loc": ["query", "wait"], "msg": f"must be at most {most:g}",
                     "type": "less_than_equal"}],
            wait_max_seconds=most,  # for clients that split a longer wait themselves
        )  # fmt: skip
    with metrics.WAITERS.track_inprogress():
        job = await _unless_disconnected(request, queue.wait(job_id, wait, until=until or "end"))
    return json_response(job_to_dict(job))


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, given up as soon as the client disconnects (ClientDisconnect, answered 499):
    a wait nobody will read must not hold its place among the waiters until it times out."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    def disconnected() -> None:
        nonlocal gone
        gone = True
        task.cancel()

    # jobq's server calls back on a disconnect; under another, a task watches the receive
    # channel (a GET's body is read by now: the next message is the disconnect).
    callbacks: list[Callable[[], None]] | None = request.scope.get(ON_DISCONNECT)
    watcher = None
    if callbacks is not None:
        callbacks.append(disconnected)
    else:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            disconnected()

        watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientDisconnect from None
    finally:
        if callbacks is not None:
            callbacks.remove(disconnected)
        if watcher is not None:
            watcher.cancel()


@router.post(
    "/jobs/{job_id}/cancel",
    summary="Cancel a job",
    response_model=CancelOut,
    responses={
        200: {"model": CancelOut, "description": "Cancelled: the job had not started."},
        202: {"model": CancelOut, "description": "Pending: the running handler was asked to stop."},
        409: openapi_problem("The job already ended; the detail names its state."),
        **_NOT_FOUND,
        **_BAD_ID,
        **COMMON_RESPONSES,
    },
)
async def cancel_job(request: Request, job_id: JobId) -> Response:
    result = await queue_of(request).request_cancel(job_id)
    if result.outcome is CancelOutcome.ALREADY_TERMINAL:
        raise ProblemError(
            409,
            "job_terminal",
            f"job {job_id} already ended as {result.job.status}",
            job_status=result.job.status,
        )
    if result.outcome is CancelOutcome.PENDING:
        return json_response({"status": "pending", "job_id": str(job_id)}, 202)
    return json_response({"status": "cancelled", "job_id": str(job_id)}, 200)


@router.post(
    "/jobs/{job_id}/retry",
    summary="Run a failed or cancelled job again",
    response_model=JobOut,
    responses={
        409: openapi_problem("Only failed_permanent or cancelled jobs can be retried."),
        **_NOT_FOUND,
        **_BAD_ID,
        **COMMON_RESPONSES,
    },
)
async def retry_job(request: Request, job_id: JobId) -> Response:
    return json_response(job_to_dict(await queue_of(request).retry(job_id)))
