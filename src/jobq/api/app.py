"""The FastAPI application: wiring, error mapping, request ids, metrics and health."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobq import __name__ as _pkg
from jobq import db, metrics, ui
from jobq.api import batch_routes, queue_routes, routes, stats_routes
from jobq.api.auth import require_token
from jobq.api.problems import Problem, ProblemError, openapi_problem, problem_response
from jobq.api.schemas import Health, batch_body, create_body_schema
from jobq.api.server import SERVER_ANSWERED
from jobq.maintenance import rollups
from jobq.queue import IdempotencyConflict, InvalidJob, InvalidTransition, JobNotFound, Queue
from jobq.registry import Registry
from jobq.settings import Settings

log = logging.getLogger("jobq.api")
access_log = logging.getLogger("jobq.access")

RETRY_AFTER_SECONDS = "2"
CLIENT_CLOSED_REQUEST = 499
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,200}$")


class RequestContextMiddleware:
    """Request id (the client's when valid), access log and HTTP metrics by route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._metric_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                supplied = value.decode("latin-1")
                break
        request_id = supplied if supplied and _REQUEST_ID.match(supplied) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # The server answered this one itself (a body timeout) and counted it.
            if not scope.get(SERVER_ANSWERED):
                elapsed = time.perf_counter() - started
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                method = metrics.method_label(scope["method"])
                key = (method, template, status)
                children = self._metric_children.get(key)
                if children is None:
                    # labels() is a lock and a dict lookup per call: look each series up once.
                    children = self._metric_children[key] = (
                        metrics.HTTP_REQUESTS.labels(method, template, str(status)),
                        metrics.HTTP_DURATION.labels(method, template),
                    )
                children[0].inc()
                children[1].observe(elapsed)
                access_log.info(
                    "%s %s %s",
                    method,
                    template,
                    status,
                    extra={"request_id": request_id, "duration_ms": round(elapsed * 1000, 2)},
                )


class InternalErrorMiddleware:
    """An exception no handler answered becomes a 500 problem document here, logged once.

    Innermost, so the answer is an ordinary complete response: Starlette's own catch-all
    (ServerErrorMiddleware, outermost) re-raises after answering, and the server then logs the
    error a second time and closes the client's keep-alive connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_noting_start)
        except Exception:
            if started:
                raise  # half a response: only closing the connection ends it
            request = Request(scope)
            log.exception("unhandled error", extra={"request_id": _request_id(request)})
            response = _problem(request, 500, "internal_error", "an internal error occurred")
            await response(scope, receive, send)


class HeadAsGetMiddleware:
    """HEAD is answered on every GET route (RFC 9110 9.3.2): run GET, send no body.

    The server still sees HEAD, so it sends no body bytes for the GET's Content-Length."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        as_get = {**scope, "method": "GET"}

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(as_get, receive, send_headers_only)
        finally:
            if "route" in as_get:  # the access log and metrics name the route template
                scope["route"] = as_get["route"]


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _problem(request: Request, status: int, error: str, detail: str, **extra: Any) -> Response:
    return problem_response(
        status,
        error,
        detail,
        instance=request.url.path,
        request_id=_request_id(request),
        **extra,
    )


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (asked of the routes, method by method)."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.routes):
            allowed.append(method)
    if "GET" in allowed and "HEAD" not in allowed:
        allowed.append("HEAD")  # HeadAsGetMiddleware
    return sorted(allowed)


def _slash_redirect(request: Request) -> Response | None:
    """307 to the same path with the trailing slash added or removed, when a route serves it.

    The Location is a path on this server, never built from the Host header, and never
    `//host` or `/\\host` (which browsers read as another site)."""
    path = request.url.path
    if path == "/":
        return None
    other = path[:-1] if path.endswith("/") else path + "/"
    if other[1:2] in {"/", "\\"} or not other.startswith("/"):
        return None
    scope = {**request.scope, "path": other}
    if not any(route.matches(scope)[0] is not Match.NONE for route in request.app.routes):
        return None
    location = quote(other, safe="/:@!$&'()*+,;=-._~")
    query = request.scope.get("query_string", b"")
    if query:
        location += "?" + query.decode("latin-1")
    return Response(status_code=307, headers={"Location": location})


def _hint(error: Any) -> str:
    msg = str(error.get("msg", ""))
    if (
        tuple(error.get("loc", ())) == ("query", "offset")
        and error.get("type") == "less_than_equal"
    ):
        msg += "; page deeper with `cursor` (the previous page's `next_cursor`)"
    return msg


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def on_problem(request: Request, exc: ProblemError) -> Response:
        return _problem(
            request, exc.status, exc.error, exc.detail, headers=exc.headers, **exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": _hint(e),
             "type": e.get("type", "")}
            for e in exc.errors()
        ]  # fmt: skip
        return _problem(request, 422, "validation_error", "the request is invalid", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404 and (redirect := _slash_redirect(request)) is not None:
            return redirect
        slug = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names only the methods of the first route matching the path.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return _problem(request, exc.status_code, slug, str(exc.detail), headers=headers or None)

    @app.exception_handler(ClientDisconnect)
    async def on_disconnect(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody is left to answer: not a server error. 499 (as nginx logs it) is what the
        # access log and jobq_http_requests_total record.
        if not request.scope.get(SERVER_ANSWERED):
            access_log.info(
                "client disconnected before it was answered",
                extra={"request_id": _request_id(request)},
            )
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(JobNotFound)
    async def on_not_found(request: Request, exc: JobNotFound) -> Response:
        return _problem(request, 404, "not_found", str(exc))

    @app.exception_handler(InvalidJob)
    async def on_invalid(request: Request, exc: InvalidJob) -> Response:
        loc = ["query" if exc.field in {"status", "offset", "cursor"} else "body", exc.field]
        return _problem(
            request,
            422,
            "validation_error",
            str(exc),
            errors=[{"loc": loc, "msg": exc.message, "type": "value_error"}],
        )

    @app.exception_handler(IdempotencyConflict)
    async def on_conflict(request: Request, exc: IdempotencyConflict) -> Response:
        extra = {} if exc.job_id is None else {"job_id": str(exc.job_id)}
        return _problem(request, 422, "idempotency_key_reused", str(exc), **extra)

    @app.exception_handler(InvalidTransition)
    async def on_transition(request: Request, exc: InvalidTransition) -> Response:
        return _problem(request, 409, "invalid_state", str(exc), job_status=exc.status)

    async def on_unavailable(request: Request, exc: Exception) -> Response:
        log.warning("database unavailable: %s", exc, extra={"request_id": _request_id(request)})
        return _problem(
            request,
            503,
            "database_unavailable",
            "the database is unavailable; retry later",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )

    @app.exception_handler(asyncpg.exceptions.ReadOnlySQLTransactionError)
    async def on_read_only(request: Request, exc: Exception) -> Response:
        # DATABASE_URL reached a hot standby (or a failover left us on one): nothing changed.
        log.warning("write refused by a read-only server: %s", exc,
                    extra={"request_id": _request_id(request)})  # fmt: skip
        return _problem(
            request,
            503,
            "database_read_only",
            "the database accepts no writes right now (a read-only standby); retry later",
            headers={"Retry-After": RETRY_AFTER_SECONDS},
        )

    # Registered per class (not as a catch-all) so the response is final and nothing is
    # re-raised into the server's error log.
    for exc_class in db.UNAVAILABLE_ERRORS:
        app.add_exception_handler(exc_class, on_unavailable)

    @app.exception_handler(asyncpg.exceptions.DataError)
    async def on_data_error(request: Request, exc: Exception) -> Response:
        # Values Postgres refuses (e.g. text it cannot store) came from the client.
        return _problem(request, 422, "validation_error", "the database refused a value")

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> Response:
        # Only an error in the middleware outside InternalErrorMiddleware gets here.
        log.exception("unhandled error", extra={"request_id": _request_id(request)})
        return _problem(request, 500, "internal_error", "an internal error occurred")


def _install_openapi(app: FastAPI, registry: Registry | None, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(problem.pop("$defs", {}))
        components["Problem"] = problem
        body, defs = create_body_schema(registry)
        components.update(defs)
        for path_item in schema.get("paths", {}).values():
            for op in path_item.values():
                if isinstance(op, dict) and op.pop("x-jobq-request-body", False):
                    op["requestBody"] = {
                        "required": True,
                        "content": {"application/json": {"schema": body}},
                    }
                if isinstance(op, dict) and op.pop("x-jobq-batch-body", False):
                    op["requestBody"] = batch_body(body, settings.batch_max)
                if isinstance(op, dict):
                    for param in op.get("parameters", []):
                        if param.get("name") == "wait" and param.get("in") == "query":
                            _set_maximum(param["schema"], settings.wait_max_seconds)
                if isinstance(op, dict):
                    # FastAPI's own 422 entry: ours is a problem document.
                    responses = op.get("responses", {})
                    if "422" in responses and "application/json" in responses["422"].get(
                        "content", {}
                    ):
                        responses["422"] = openapi_problem("Invalid request.")
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    settings: Settings | None = None,
    *,
    dsn: str | None = None,
    registry: Registry | None = None,
    pool: asyncpg.Pool | None = None,
    read_pool: asyncpg.Pool | None = None,
) -> FastAPI:
    """The API over the database at `dsn` (or an existing pool). With a registry, enqueue
    checks kinds and payloads, and the OpenAPI document shows each kind's payload schema.

    Reads that tolerate lag (job lists, stats, the jobq_jobs gauge) go to `read_pool`, or to
    a pool on JOBQ_READ_DATABASE_URL; everything else, `GET /jobs/{id}` included (a client
    reads its own write), goes to the primary."""
    settings = settings or Settings.from_env()
    if pool is None and dsn is None:
        raise ValueError("create_app needs a dsn or a pool")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_pool = pool is None
        # min_size=0: the API starts (and reports not ready) while the database is down.
        the_pool = pool or await db.create_pool(
            dsn or "", min_size=0, max_size=settings.pool_max_size, pooler=settings.pooler
        )
        app.state.pool = the_pool
        # Waiters (GET /jobs/{id}?wait=) listen on a connection of their own while anyone
        # waits: JOBQ_LISTEN_DATABASE_URL behind a transaction pooler, else DATABASE_URL.
        listen_dsn = settings.listen_database_url or dsn
        app.state.queue = Queue(
            the_pool,
            default_max_attempts=settings.default_max_attempts,
            history_leaf_width=settings.history_leaf_width,
            idempotency_window=settings.idempotency_window,
            listen_dsn=listen_dsn,
            pooler=_listen_pooler(settings, listen_dsn),
            middleware=registry.middleware if registry is not None else (),
            unique=registry.unique_defaults if registry is not None else None,
        )
        own_read_pool = read_pool is None and settings.read_database_url is not None
        reads = read_pool
        if own_read_pool:
            reads = await db.create_pool(
                settings.read_database_url or "",
                min_size=0,
                max_size=settings.pool_max_size,
                pooler=settings.pooler,
            )
        app.state.read_queue = app.state.queue if reads is None else Queue(reads)
        # Keeps the operator views' rollups small while no worker runs (primary only).
        compactor = asyncio.create_task(rollups.compact_forever(the_pool), name="jobq-rollups")
        try:
            yield
        finally:
            await app.state.queue.close_watcher()
            compactor.cancel()
            await asyncio.gather(compactor, return_exceptions=True)
            if own_read_pool and reads is not None:
                await reads.close()
            if own_pool:
                await the_pool.close()

    # The docs pages serve Swagger UI and ReDoc from the package, not a CDN: they work offline.
    app = FastAPIOffline(
        title="jobq",
        version=_version(),
        description="A job queue on PostgreSQL. Every error is an RFC 9457 problem document."
        " Besides the answers each operation lists, the server itself may answer any request"
        " with 400 (malformed HTTP framing), 408 (headers or body sent too slowly), 431 (header"
        " section over JOBQ_HTTP_MAX_HEADER_BYTES) or 503 (JOBQ_HTTP_MAX_CONNECTIONS open"
        " connections), each a problem document, and then closes the connection. Every GET"
        " route answers HEAD.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    if pool is not None:
        app.state.pool = pool
        app.state.queue = Queue(
            pool,
            default_max_attempts=settings.default_max_attempts,
            history_leaf_width=settings.history_leaf_width,
            idempotency_window=settings.idempotency_window,
            middleware=registry.middleware if registry is not None else (),
            unique=registry.unique_defaults if registry is not None else None,
        )
        app.state.read_queue = app.state.queue if read_pool is None else Queue(read_pool)
    # Starlette's slash redirect builds its Location from the Host header: see _slash_redirect.
    app.router.redirect_slashes = False
    app.add_middleware(InternalErrorMiddleware)  # added first: innermost
    if settings.otel or _otel_instrumented():
        from jobq import otel

        otel.instrument()
        app.add_middleware(otel.RequestContext)  # inside the request id's
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(RequestContextMiddleware)  # added last: outermost
    _install_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(batch_routes.router)
    app.include_router(stats_routes.router)
    app.include_router(queue_routes.router)
    ui.install(app)
    _install_health(app, settings)
    _install_openapi(app, registry, settings)
    return app


def _set_maximum(schema: dict[str, Any], most: float) -> None:
    """The configured bound (JOBQ_WAIT_MAX_SECONDS) in a parameter's schema."""
    for variant in schema.get("anyOf", [schema]):
        if variant.get("type") == "number":
            variant["maximum"] = most


def _listen_pooler(settings: Settings, listen_dsn: str | None) -> str:
    """How the listen URL is reached: JOBQ_LISTEN_DATABASE_URL is direct or session-pooled."""
    if settings.listen_database_url and listen_dsn == settings.listen_database_url:
        return "none" if settings.pooler == "none" else "session"
    return settings.pooler


def _install_health(app: FastAPI, settings: Settings) -> None:
    @app.get("/healthz", tags=["health"], response_model=Health, summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        response_model=Health,
        summary="The database is reachable",
        responses={503: {"model": Health, "description": "The database is unreachable."}},
    )
    async def readyz(request: Request) -> Response:
        try:
            await request.app.state.pool.fetchval("SELECT 1", timeout=2)
        except Exception as exc:
            if not db.is_unavailable(exc):
                raise
            return Response(
                b'{"status":"unavailable"}',
                status_code=503,
                media_type="application/json",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        return Response(b'{"status":"ok"}', media_type="application/json")

    metric_deps = [] if not settings.protect_metrics else [require_token]
    from fastapi import Depends

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics",
        dependencies=[Depends(d) for d in metric_deps],
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
        response_class=Response,
    )
    async def prometheus(request: Request) -> Response:
        # Job counts are read at scrape time; a scrape during an outage still serves the rest.
        with contextlib.suppress(*db.UNAVAILABLE_ERRORS):
            metrics.set_job_counts(await request.app.state.read_queue.counts())
            metrics.set_limits(await request.app.state.read_queue.limit_usage())
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)


def _otel_instrumented() -> bool:
    """jobq.otel.instrument() was called in this process (without importing OpenTelemetry)."""
    otel = sys.modules.get("jobq.otel")
    return otel is not None and bool(otel.instrumented())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(_pkg)
    except PackageNotFoundError:  # pragma: no cover
        return "0"
