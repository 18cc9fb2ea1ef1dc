"""POST /jobs/batch: many jobs in one request and one round trip to the database, all or none."""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Depends, Header, Request
from starlette.responses import Response

from jobq import metrics
from jobq.api.auth import require_token
from jobq.api.problems import COMMON_RESPONSES, ProblemError, openapi_problem
from jobq.api.routes import (
    job_of,
    json_response,
    new_job,
    queue_of,
    read_json_body,
    strict_query,
)
from jobq.api.schemas import JobBatchOut, JobCreate, job_row_to_dict
from jobq.queue import IdempotencyConflict, InvalidJob, NewJob, encode_json, validate

router = APIRouter(dependencies=[Depends(require_token), Depends(strict_query)], tags=["jobs"])

BATCH_EXAMPLE = {
    "jobs": [
        {"kind": "email.send", "payload": {"to": "a@example.com"}, "idempotency_key": "mail-1"},
        {"kind": "report.build", "payload": {"month": "2030-01"}, "queue": "reports"},
    ]
}


@router.post(
    "/jobs/batch",
    status_code=201,
    summary="Enqueue many jobs at once",
    description="Up to JOBQ_BATCH_MAX jobs (default 1000), each what `POST /jobs` takes, in one"
    " transaction: every job is checked first, and if any is invalid nothing is stored and the"
    ' 422 lists each bad job by index and field (`loc: ["body", "jobs", 3, "priority"]`).'
    " Each job may carry its own `idempotency_key` (the `Idempotency-Key` header is not"
    " accepted here): a key stored before with the same request answers the job it made,"
    " `created: false`; with a different request, or given twice in the batch for different"
    " jobs, the batch is refused with 422 `idempotency_key_reused` naming the first such job."
    " The answer lists the jobs in request order, each whole with `created`.",
    response_model=None,
    responses={
        201: {
            "model": JobBatchOut,
            "description": "Stored: at least one job was created by this request.",
        },
        200: {
            "model": JobBatchOut,
            "description": "Every job was an idempotent replay (or the batch was empty).",
        },
        413: openapi_problem(
            "More jobs than JOBQ_BATCH_MAX (`batch_too_large`), or a body larger than"
            " JOBQ_BATCH_MAX_BYTES (`payload_too_large`). Nothing was stored: send smaller"
            " batches."
        ),
        415: openapi_problem("The body is not `application/json` UTF-8, uncompressed."),
        422: openapi_problem(
            "Invalid body or jobs (every bad job is listed in `errors`, by index), or an"
            " idempotency key reused with a different request. Nothing was stored."
        ),
        **COMMON_RESPONSES,
    },
    openapi_extra={"x-jobq-batch-body": True},
)
async def enqueue_batch(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Not accepted here (422): give each job its own `idempotency_key`.",
            include_in_schema=False,
        ),
    ] = None,
) -> Response:
    if idempotency_key is not None:
        raise ProblemError(
            422,
            "validation_error",
            "the Idempotency-Key header is not accepted for a batch: give each job its own"
            " idempotency_key",
            errors=[{"loc": ["header", "Idempotency-Key"], "msg": "not accepted for a batch",
                     "type": "unexpected_header"}],
        )  # fmt: skip
    settings = request.app.state.settings
    body = await read_json_body(request, settings.batch_max_bytes)
    items = _items(body)
    if len(items) > settings.batch_max:
        raise ProblemError(
            413,
            "batch_too_large",
            f"{len(items)} jobs is more than the {settings.batch_max} a batch may hold"
            " (JOBQ_BATCH_MAX); send smaller batches",
            batch_max=settings.batch_max,
        )
    registry = request.app.state.registry
    # The common case, every job well formed, in one pass of the validator over the list;
    # otherwise job by job, which words and locates each error as POST /jobs does.
    checked = _checked(items)
    jobs: list[NewJob] = []
    payloads: list[str] = []
    errors: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        try:
            if checked is not None:
                job = validate(job_of(checked[i], None, registry))
            else:
                job = validate(new_job(item, None, registry))
            payload = encode_json("payload", job.payload)
        except ProblemError as exc:
            errors += _at(i, exc.extra.get("errors") or [_whole(exc.detail, exc.error)])
            continue
        except InvalidJob as exc:
            errors.append(_error(i, [exc.field], exc.message, "value_error"))
            continue
        if len(payload) > settings.max_payload_bytes and (
            len(payload.encode()) > settings.max_payload_bytes
        ):
            errors.append(
                _error(i, ["payload"], f"larger than {settings.max_payload_bytes} bytes"
                       " (JOBQ_MAX_PAYLOAD_BYTES)", "too_large")
            )  # fmt: skip
            continue
        jobs.append(job)
        payloads.append(payload)
    if errors:
        bad = len({e["loc"][2] for e in errors})
        raise ProblemError(
            422,
            "validation_error",
            f"{bad} of {len(items)} jobs {'is' if bad == 1 else 'are'} invalid; nothing was stored",
            errors=errors,
        )
    try:
        stored = await queue_of(request).enqueue_job_rows(jobs, payloads=payloads, validated=True)
    except IdempotencyConflict as exc:
        index = exc.index if exc.index is not None else 0
        loc: list[str | int] = ["body", "jobs", index, "idempotency_key"]
        raise ProblemError(
            422,
            "idempotency_key_reused",
            f"job {index}: {exc}; nothing was stored",
            errors=[{"loc": loc, "msg": str(exc), "type": "idempotency_key_reused"}],
            job_id=None if exc.job_id is None else str(exc.job_id),
        ) from None
    except InvalidJob as exc:
        # From an enqueue middleware: the job it refused or replaced by an invalid one, by
        # index when known (a middleware names it with InvalidJob(..., index=i)).
        where = "jobs" if exc.index is None else f"job {exc.index}"
        loc = ["body", "jobs"] if exc.index is None else ["body", "jobs", exc.index, exc.field]
        raise ProblemError(
            422,
            "validation_error",
            f"{where}: {exc}; nothing was stored",
            errors=[{"loc": loc, "msg": exc.message, "type": "value_error"}],
        ) from None
    created: dict[str, int] = {}
    out = []
    for row, was_created in stored:
        entry = job_row_to_dict(row)
        entry["created"] = was_created
        out.append(entry)
        if was_created:
            created[entry["kind"]] = created.get(entry["kind"], 0) + 1
    for kind, n in created.items():
        metrics.JOBS_ENQUEUED.labels(metrics.kind_label(kind, registry)).inc(n)
    return json_response({"jobs": out}, 201 if created else 200)


_JOB_LIST = pydantic.TypeAdapter(list[JobCreate])


def _checked(items: list[Any]) -> list[JobCreate] | None:
    """Each item as a `JobCreate`, or None when any is not one."""
    try:
        return _JOB_LIST.validate_python(items)
    except pydantic.ValidationError:
        return None


def _items(body: Any) -> list[Any]:
    if not isinstance(body, dict) or set(body) != {"jobs"} or not isinstance(body["jobs"], list):
        raise ProblemError(
            422,
            "validation_error",
            'the body must be a JSON object {"jobs": [...]} with the jobs and nothing else',
            errors=[{"loc": ["body"], "msg": 'expected {"jobs": [...]}', "type": "model_type"}],
        )
    items: list[Any] = body["jobs"]
    return items


def _at(index: int, errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A job's field errors (located in `body`) located in the batch: body, jobs, index, ..."""
    return [{**e, "loc": ["body", "jobs", index, *e["loc"][1:]]} for e in errors]


def _whole(detail: str, error: str) -> dict[str, Any]:
    return {"loc": ["body"], "msg": detail, "type": error}


def _error(index: int, loc: list[str | int], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", "jobs", index, *loc], "msg": msg, "type": kind}
