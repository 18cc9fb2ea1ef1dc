"""Queue routes: `GET /queues`, and pausing and resuming a queue or a kind."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

import orjson
from fastapi import APIRouter, Depends, Path, Request
from starlette.convertors import Convertor, register_url_convertor
from starlette.responses import Response

from jobq import wire
from jobq.api.auth import require_token
from jobq.api.problems import COMMON_RESPONSES, ProblemError, openapi_problem
from jobq.api.routes import read_json_body, strict_query
from jobq.api.schemas import FlowStateOut, QueuesOut, flow_state_to_dict
from jobq.queue import (
    MAX_NAME_LENGTH,
    STATUSES,
    FlowState,
    InvalidJob,
    Queue,
    TooManyPaused,
)
from jobq.queue.flow import MAX_PAUSED_BY_LENGTH, check_paused_by
from jobq.queue.validation import _check_name

router = APIRouter(dependencies=[Depends(require_token), Depends(strict_query)], tags=["queues"])

# Printable characters only; the pattern states the part JSON Schema can: no C0/C1 controls.
_NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"
QueueName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=_NAME_PATTERN,
        description="The queue's name (1 to 255 printable characters). It need not have jobs.",
    ),
]
KindName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=_NAME_PATTERN,
        description="The job kind (1 to 255 printable characters). It need not have jobs.",
    ),
]
_BAD_NAME: dict[int | str, dict[str, Any]] = {
    422: openapi_problem(
        "The name is empty, too long, holds control characters or is not UTF-8 (percent-"
        'encoded bytes that decode to no text): `loc` is `["path", "name"]`.'
    )
}
_PAUSE_BODY: dict[int | str, dict[str, Any]] = {
    415: openapi_problem("A body that is not `application/json` UTF-8, uncompressed."),
    422: openapi_problem(
        'The name is bad (`loc` `["path", "name"]`), or the body is not JSON or not `{"by":'
        ' "<who>"}` with `by` 1 to 200 printable characters (`loc` `["body", ...]`).'
    ),
}
# The optional body: who pauses (shown as `paused_by`).
_BY_SCHEMA = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "by": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": MAX_PAUSED_BY_LENGTH,
                            "pattern": _NAME_PATTERN,
                            "description": "Who pauses (a person, a script): shown as"
                            " `paused_by` until the resume.",
                        }
                    },
                    "additionalProperties": False,
                }
            }
        },
    }
}
_RESUME_BODY: dict[int | str, dict[str, Any]] = {
    415: _PAUSE_BODY[415],
    422: openapi_problem(
        'The name is bad (`loc` `["path", "name"]`), or a body was sent that is not an empty'
        ' JSON object (`loc` `["body", ...]`).'
    ),
}
# A resume takes no field: a body, if any, is `{}`.
_NO_FIELDS = {
    "requestBody": {
        "required": False,
        "content": {
            "application/json": {"schema": {"type": "object", "additionalProperties": False}}
        },
    }
}
_TOO_MANY: dict[int | str, dict[str, Any]] = {
    409: openapi_problem(
        "`too_many_paused`: JOBQ_MAX_PAUSED queues and kinds are paused already (pausing one"
        " that is paused is always accepted)."
    )
}


class _AnyName(Convertor[str]):
    """Any text, `/` and line breaks too (Starlette's `path` stops at a line break, which would
    make such a name a 404 instead of the 422 it is)."""

    regex = "(?s:.+)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("jobq_name", _AnyName())
# A name may hold `/` (`a/b`, or `a%2Fb`): the converter takes it whole.
_QUEUE = "/queues/{name:jobq_name}"
_KIND = "/kinds/{name:jobq_name}"


def _name(request: Request, scope: str, name: str) -> str:
    """The name the path holds, checked as the queue core checks it, every error at the path:
    the server decodes percent-escapes that are not UTF-8 to replacement characters, which
    would pause another name, so the raw path is read first."""
    raw = request.scope.get("raw_path")
    if raw is not None:
        try:
            wire.decode_utf8(unquote_to_bytes(raw), "the path")
        except wire.WireError as exc:
            raise ProblemError(
                422,
                exc.error,
                exc.message,
                errors=[{"loc": ["path", "name"], "msg": exc.message, "type": exc.error}],
            ) from None
    try:
        return _check_name(scope, name)
    except InvalidJob as exc:
        raise ProblemError(
            422,
            "validation_error",
            f"the {scope} name {exc.message}",
            errors=[{"loc": ["path", "name"], "msg": exc.message, "type": "value_error"}],
        ) from None


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length", "").strip()
    if "transfer-encoding" in request.headers:
        return True
    return length != "" and (not length.isdigit() or int(length) > 0)


async def _body(request: Request, fields: tuple[str, ...], shape: str) -> dict[str, Any]:
    """The optional JSON object body of a pause or a resume, holding no field but `fields`:
    any other body is refused rather than ignored. No body is an empty one."""
    if not _has_body(request):
        return {}
    body = await read_json_body(request, limit=4096)
    if not isinstance(body, dict):
        raise ProblemError(
            422, "validation_error", f"the body must be a JSON object {shape}",
            errors=[{"loc": ["body"], "msg": "expected an object", "type": "model_type"}],
        )  # fmt: skip
    extra = [k for k in body if k not in fields]
    if extra:
        takes = f"only `{fields[0]}`" if fields else "no field"
        raise ProblemError(
            422, "validation_error", f"unknown field {extra[0][:40]!r}: the body takes {takes}",
            errors=[{"loc": ["body", k], "msg": "unknown field", "type": "extra_forbidden"}
                    for k in extra],
        )  # fmt: skip
    return body


async def _paused_by(request: Request) -> str | None:
    """Who pauses: the optional body `{"by": "<who>"}`. No body, or none in it, is no one."""
    body = await _body(request, ("by",), '{"by": "<who>"}')
    if "by" not in body:
        return None
    try:
        if body["by"] is None:  # the schema's `by` is a string: null is not "no one"
            raise InvalidJob("by", f"must be a string of 1 to {MAX_PAUSED_BY_LENGTH} characters")
        return check_paused_by(body["by"])
    except InvalidJob as exc:
        raise ProblemError(
            422, "validation_error", f"by: {exc.message}",
            errors=[{"loc": ["body", "by"], "msg": exc.message, "type": "value_error"}],
        ) from None  # fmt: skip


async def _pause(request: Request, scope: str, name: str) -> Response:
    checked = _name(request, scope, name)
    by = await _paused_by(request)
    try:
        state = await _queue(request).pause(
            scope, checked, by=by, max_paused=request.app.state.settings.max_paused
        )
    except TooManyPaused as exc:
        raise ProblemError(409, "too_many_paused", str(exc), max_paused=exc.limit) from None
    return _state(state)


async def _resume(request: Request, scope: str, name: str) -> Response:
    checked = _name(request, scope, name)
    await _body(request, (), "{}")
    return _state(await _queue(request).resume(scope, checked))


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _queue(request: Request) -> Queue:
    queue: Queue = request.app.state.queue
    return queue


def _state(state: FlowState) -> Response:
    return _json(flow_state_to_dict(state))


@router.get(
    "/queues",
    summary="Queues with their state and counts",
    response_model=QueuesOut,
    responses={422: openapi_problem("An unknown or repeated query parameter."), **COMMON_RESPONSES},
)
async def list_queues(request: Request) -> Response:
    """Every queue that has jobs, a pause or a limit: paused or not, its limits, and its jobs
    by status (from the count rollups: constant time). Also every kind paused or limited."""
    queue = _queue(request)
    infos = await queue.queue_infos()
    states = await queue.flow_states()
    queues = []
    for info in infos:
        counts = {s: info.counts.get(s, 0) for s in STATUSES}
        queues.append(
            {**flow_state_to_dict(info.state), "counts": counts, "total": sum(counts.values())}
        )
    kinds = [flow_state_to_dict(s) for s in states if s.scope == "kind"]
    return _json({"queues": queues, "kinds": kinds})


@router.post(
    _QUEUE + "/pause",
    summary="Pause a queue",
    response_model=FlowStateOut,
    responses={**_BAD_NAME, **_PAUSE_BODY, **_TOO_MANY, **COMMON_RESPONSES},
    openapi_extra=_BY_SCHEMA,
)
async def pause_queue(request: Request, name: QueueName) -> Response:
    """No worker, on any host, claims this queue's jobs once this returns (a claim that
    started before it may still finish). Running jobs finish; enqueue goes on. The pause is
    stored: it holds across restarts until resumed. A queue with no jobs yet can be paused.
    Pausing a paused queue changes nothing. An optional body `{"by": "<who>"}` says who
    pauses: it is answered, and listed by `GET /queues`, as `paused_by` (the first pause's,
    until the resume); any other body is a 422 problem. At most JOBQ_MAX_PAUSED (default
    1,000) queues and kinds are paused at once: a new pause beyond it is a 409 problem."""
    return await _pause(request, "queue", name)


@router.post(
    _QUEUE + "/resume",
    summary="Resume a queue",
    response_model=FlowStateOut,
    responses={**_RESUME_BODY, **COMMON_RESPONSES},
    openapi_extra=_NO_FIELDS,
)
async def resume_queue(request: Request, name: QueueName) -> Response:
    """Workers claim this queue's jobs again. Resuming a queue that is not paused changes
    nothing. A body, if any, is `{}`: one with a field is a 422 problem."""
    return await _resume(request, "queue", name)


@router.post(
    _KIND + "/pause",
    summary="Pause a kind, in every queue",
    response_model=FlowStateOut,
    responses={**_BAD_NAME, **_PAUSE_BODY, **_TOO_MANY, **COMMON_RESPONSES},
    openapi_extra=_BY_SCHEMA,
)
async def pause_kind(request: Request, name: KindName) -> Response:
    """As pausing a queue, for the jobs of one kind wherever they are queued."""
    return await _pause(request, "kind", name)


@router.post(
    _KIND + "/resume",
    summary="Resume a kind",
    response_model=FlowStateOut,
    responses={**_RESUME_BODY, **COMMON_RESPONSES},
    openapi_extra=_NO_FIELDS,
)
async def resume_kind(request: Request, name: KindName) -> Response:
    """As resuming a queue, for the jobs of one kind."""
    return await _resume(request, "kind", name)
