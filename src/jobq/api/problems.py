"""RFC 9457 problem details: the one shape of every error response."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from pydantic import BaseModel, Field
from starlette.responses import Response

PROBLEM_MEDIA_TYPE = "application/problem+json"


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where the error is: body, query, path, header.")
    msg: str
    type: str


class Problem(BaseModel):
    """An error, as RFC 9457 describes it, plus a short machine-readable `error` slug."""

    type: str = Field(description="A URI identifying the kind of problem.")
    title: str = Field(description="Short summary of the kind of problem.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="What went wrong with this request.")
    error: str = Field(description="Machine-readable slug, e.g. `not_found`.")
    instance: str | None = Field(default=None, description="The request path.")
    errors: list[FieldError] | None = Field(default=None, description="Per-field errors.")
    request_id: str | None = None


class ProblemError(Exception):
    """Raise from a route to answer with a problem."""

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem_body(
    status: int,
    error: str,
    detail: str,
    *,
    instance: str | None = None,
    request_id: str | None = None,
    **extra: Any,
) -> bytes:
    """The JSON of a problem document (also written by the HTTP server itself)."""
    body: dict[str, Any] = {
        "type": f"urn:jobq:problem:{error.replace('_', '-')}",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "error": error,
    }
    if instance is not None:
        body["instance"] = instance
    if request_id is not None:
        body["request_id"] = request_id
    body.update({k: v for k, v in extra.items() if v is not None})
    return orjson.dumps(body)


def problem_response(
    status: int,
    error: str,
    detail: str,
    *,
    instance: str | None = None,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    body = problem_body(status, error, detail, instance=instance, request_id=request_id, **extra)
    return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def openapi_problem(description: str) -> dict[str, Any]:
    """An entry for a route's `responses=`: a problem body with the problem media type."""
    return {
        "description": description,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


# Every data route can answer these two.
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: openapi_problem("Missing or invalid bearer token (when auth is on)."),
    503: openapi_problem("The database is unavailable; retry after `Retry-After` seconds."),
}
