"""What the client raises: a problem document the API answered, as a typed exception per
problem type (its `error` slug), a failure to get any answer, or input it cannot send."""

from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """The base of everything `jobq.client` raises."""


class InvalidRequest(ClientError, ValueError):
    """Refused before anything was sent: an argument no request can carry (a job id that is
    not a UUID, a payload that is not a JSON object, a token or header that is not printable
    ASCII, a timeout that is not a finite number >= 0). A ValueError too."""


class TransportError(ClientError):
    """No answer from the API (connection refused, reset, timed out), after any retries.
    The underlying httpx error is the `__cause__`."""


class UnexpectedResponse(ClientError):
    """An answer that is not the API's: no problem document where one was due (e.g. a proxy's
    error page), or a body that is not the JSON expected."""

    def __init__(self, status: int, message: str, text: str = "") -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.text = text[:2000]


class APIError(ClientError):
    """The API answered with an RFC 9457 problem document.

    `error` is its machine-readable slug (`not_found`), `type` its URI, `status` the HTTP
    status, `detail` what went wrong, `errors` the per-field errors (`loc`, `msg`, `type`),
    `body` the whole document (extension members such as `job_status` included).
    """

    error: str = ""  # the slug a subclass stands for

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.error = str(body.get("error") or type(self).error)
        self.type = str(body.get("type", ""))
        self.title = str(body.get("title", ""))
        self.detail = str(body.get("detail", ""))
        self.instance: str | None = body.get("instance")
        self.request_id: str | None = body.get("request_id")
        errors = body.get("errors")
        self.errors: list[dict[str, Any]] = errors if isinstance(errors, list) else []
        super().__init__(f"{status} {self.error}: {self.detail}")


class BadRequest(APIError):
    """400: the request was not valid HTTP."""

    error = "bad_request"


class Unauthorized(APIError):
    """401: a bearer token is required and was missing or not known."""

    error = "unauthorized"


class NotFound(APIError):
    """404: no such job (or route)."""

    error = "not_found"


class MethodNotAllowed(APIError):
    error = "method_not_allowed"


class RequestTimeout(APIError):
    """408: the request's headers or body took too long to arrive."""

    error = "request_timeout"


class JobTerminal(APIError):
    """409: the job already ended, so it cannot be cancelled; `job_status` names its state."""

    error = "job_terminal"

    @property
    def job_status(self) -> str | None:
        return self.body.get("job_status")


class InvalidState(APIError):
    """409: the job is not in a state that allows the operation (e.g. retry of a queued job)."""

    error = "invalid_state"

    @property
    def job_status(self) -> str | None:
        return self.body.get("job_status")


class PayloadTooLarge(APIError):
    """413: the body is larger than the API's JOBQ_MAX_PAYLOAD_BYTES."""

    error = "payload_too_large"


class BatchTooLarge(APIError):
    """413: more jobs in one batch than the API's JOBQ_BATCH_MAX (`batch_max`)."""

    error = "batch_too_large"

    @property
    def batch_max(self) -> int | None:
        return self.body.get("batch_max")


class UnsupportedMediaType(APIError):
    error = "unsupported_media_type"


class ValidationError(APIError):
    """422: the request is invalid; `errors` names each field."""

    error = "validation_error"


class UnknownKind(APIError):
    """422: no handler for this kind (an API started with a registry)."""

    error = "unknown_kind"


class InvalidPayload(APIError):
    """422: the payload does not fit the kind's model."""

    error = "invalid_payload"


class IdempotencyKeyReused(APIError):
    """422: the idempotency key belongs to a job created by a different request."""

    error = "idempotency_key_reused"

    @property
    def job_id(self) -> str | None:
        return self.body.get("job_id")


class InvalidJSON(APIError):
    error = "invalid_json"


class InvalidUTF8(APIError):
    error = "invalid_utf8"


class DuplicateKey(APIError):
    error = "duplicate_key"


class NumberOutOfRange(APIError):
    error = "number_out_of_range"


class InvalidTime(APIError):
    error = "invalid_time"


class HeaderTooLarge(APIError):
    """431: the request line and headers exceed the server's limit."""

    error = "request_header_fields_too_large"


class InternalError(APIError):
    error = "internal_error"


class HTTPError(APIError):
    """Another HTTP error the API's framework answered."""

    error = "http_error"


class Unavailable(APIError):
    """503: try again later (the client does, for idempotent calls, honouring Retry-After)."""

    error = "unavailable"


class DatabaseUnavailable(Unavailable):
    error = "database_unavailable"


class DatabaseReadOnly(Unavailable):
    """503: the database is a read-only standby right now."""

    error = "database_read_only"


class TooManyConnections(Unavailable):
    error = "too_many_connections"


PROBLEM_TYPES: dict[str, type[APIError]] = {
    cls.error: cls
    for cls in (
        BadRequest, Unauthorized, NotFound, MethodNotAllowed, RequestTimeout, JobTerminal,
        InvalidState, PayloadTooLarge, BatchTooLarge, UnsupportedMediaType, ValidationError,
        UnknownKind, InvalidPayload, IdempotencyKeyReused, InvalidJSON, InvalidUTF8, DuplicateKey,
        NumberOutOfRange, InvalidTime, HeaderTooLarge, InternalError, HTTPError,
        DatabaseUnavailable, DatabaseReadOnly, TooManyConnections,
    )
}  # fmt: skip


def problem_error(status: int, body: dict[str, Any]) -> APIError:
    """The exception for a problem document: its slug's class; for a slug this client does
    not know, `Unavailable` for a 503 and `APIError` otherwise."""
    cls = PROBLEM_TYPES.get(str(body.get("error")))
    if cls is None:
        cls = Unavailable if status == 503 else APIError
    return cls(status, body)
