"""The HTTP server under the API: uvicorn's httptools protocol with the limits it lacks.

uvicorn bounds neither the size of a request's header section (httptools buffers a header of
any size) nor the time a client may take to send its headers or body, nor the number of open
connections (`limit_concurrency` answers 503 only once headers are complete, so idle and slow
connections are never counted against it). This protocol adds, per connection:

- a header size limit: 431 once the request line and headers exceed `http_max_header_bytes`;
- a header timeout: 408 (or a silent close when nothing was sent) when the headers are not
  complete `http_header_timeout_seconds` after the connection opened or the request began;
- a body timeout: 408 when the body is not complete `http_body_timeout_seconds` after the
  headers (a response already sent just closes the connection);
- a connection limit: beyond `http_max_connections` open connections, a new one gets 503 with
  `Retry-After` and is closed;

and answers its own rejections, uvicorn's 400 for malformed framing included, with problem
documents carrying `x-request-id`. Idle keep-alive connections close after
`http_keepalive_seconds` (uvicorn's own timer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from jobq import metrics
from jobq.api.problems import PROBLEM_MEDIA_TYPE, problem_body
from jobq.settings import Settings

# Set in a request's ASGI scope when the server itself answered it (a body timeout): the
# application then neither counts nor logs it.
SERVER_ANSWERED = "jobq.server_answered"
# In every request's ASGI scope: the connection's list of callbacks the server calls when the
# client disconnects. A request adds one while it waits (and removes it): no task of its own
# reads the receive channel for the disconnect.
ON_DISCONNECT = "jobq.on_disconnect"

log = logging.getLogger("jobq.access")

_REQUEST_ID = re.compile(rb"^[\x21-\x7e]{1,200}$")
RETRY_AFTER_SECONDS = "2"
# How long a rejected connection is drained before it is closed (see _close_lingering).
LINGER_SECONDS = 2.0


class _Rejected(Exception):
    """Raised from a parser callback to stop parsing; the protocol answers `status`."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


class JobqHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus header size, header and body time, and connection limits."""

    settings: Settings = Settings()  # set by `protocol_for`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._awaiting_headers = True  # between requests, or inside a request's headers
        self._header_bytes = 0
        self._request_begun = False
        self._headers_completed = False
        self._rejected = False
        self._linger_timer: asyncio.TimerHandle | None = None
        self._on_disconnect: list[Callable[[], None]] = []

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.settings.http_max_connections:
            self.connections.discard(self)
            self._reject(
                503,
                "too_many_connections",
                f"the server has {self.settings.http_max_connections} open connections; "
                "retry later",
                headers=[(b"retry-after", RETRY_AFTER_SECONDS.encode())],
            )
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)
        for callback in list(self._on_disconnect):
            callback()

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        self._unset_keepalive_if_required()
        counted = self._awaiting_headers
        self._headers_completed = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            rejected = exc.__context__ if isinstance(exc.__context__, _Rejected) else None
            if rejected is None:
                rejected = _Rejected(400, "bad_request", "the request is not valid HTTP/1.1")
            self._reject(rejected.status, rejected.error, rejected.detail)
            return
        except httptools.HttpParserError as exc:
            self._reject(400, "bad_request", f"the request is not valid HTTP/1.1: {_reason(exc)}")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        # Headers still incomplete: bound what the parser buffers, even inside one header.
        # (A chunk in which an earlier request's headers completed is not counted: at most one
        # read's worth escapes the count, and on_headers_complete checks the exact size.)
        if counted and self._awaiting_headers and self._request_begun:
            if not self._headers_completed:
                self._header_bytes += len(data)
            if self._header_bytes > self.settings.http_max_header_bytes:
                self._reject_header_size()

    def send_400_response(self, msg: str) -> None:
        self._reject(400, "bad_request", "the request is not valid HTTP/1.1")

    # -- parser callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        cast(dict[str, Any], self.scope)[ON_DISCONNECT] = self._on_disconnect
        self._request_begun = True
        self._awaiting_headers = True
        self._header_bytes = 0
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.settings.http_max_header_bytes:
            raise _Rejected(*_header_too_large(self.settings))
        self._awaiting_headers = False
        self._headers_completed = True
        self._request_begun = False
        self._cancel_header_timer()
        self._body_timer = self.loop.call_later(
            self.settings.http_body_timeout_seconds, self._on_body_timeout
        )
        super().on_headers_complete()
        if self.cycle is not None:  # the cycle this request made (its task has not run yet)
            self.cycle.transport = cast(
                asyncio.Transport, _HeadersWithBody(self.transport, self.cycle)
            )

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._awaiting_headers = True
        super().on_message_complete()

    # -- timeouts --------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(
            self.settings.http_header_timeout_seconds, self._on_header_timeout
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is still being sent: let it finish, then close.
            self.cycle.keep_alive = False
            return
        if not self._request_begun:
            self.transport.close()  # nothing was sent: no request to answer
            return
        seconds = self.settings.http_header_timeout_seconds
        self._reject(408, "request_timeout", f"the request headers took longer than {seconds:g} s")

    def _on_body_timeout(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None:
            return
        if cycle.response_started:
            self.transport.close()  # answered without the rest of the body: drop the rest
            return
        # The application is told the client is gone; it must not answer on top of ours, nor
        # count or log the request a second time (as a 499) under a request id of its own.
        cast(dict[str, Any], self.scope)[SERVER_ANSWERED] = True
        cycle.disconnected = True
        cycle.message_event.set()
        seconds = self.settings.http_body_timeout_seconds
        self._reject(408, "request_timeout", f"the request body took longer than {seconds:g} s")

    # -- answering -------------------------------------------------------------------------

    def _reject_header_size(self) -> None:
        self._reject(*_header_too_large(self.settings))

    def _reject(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer with a problem document and close: after a framing error, a timeout or an
        oversized header section the connection cannot be trusted to carry another request."""
        self._rejected = True
        self._cancel_timers()
        request_id = self._request_id()
        body = problem_body(status, error, detail, request_id=request_id)
        lines = [STATUS_LINE[status]]
        for name, value in [
            *self.server_state.default_headers,
            (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode()),
            (b"connection", b"close"),
            *(headers or []),
        ]:
            lines += [name, b": ", value, b"\r\n"]
        if not self.transport.is_closing():
            self.transport.write(b"".join([*lines, b"\r\n", body]))
            self._close_lingering()
        method = self.scope.get("method", "") if self.scope else ""
        metrics.HTTP_REQUESTS.labels(metrics.method_label(method), "unmatched", str(status)).inc()
        log.info("%s rejected: %s", status, detail, extra={"request_id": request_id})

    def _close_lingering(self) -> None:
        """Send the answer and a FIN, then read and drop what the client still sends for a
        moment before closing: closing with unread input makes the kernel send a reset, and
        the client may never see the answer."""
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _request_id(self) -> str:
        for name, value in self.headers or ():
            if name == b"x-request-id" and _REQUEST_ID.match(value):
                return value.decode("ascii")
        return uuid.uuid4().hex


# The largest body an answer's headers are joined to (larger ones are written after them).
_JOIN_AT_MOST = 64 * 1024


class _HeadersWithBody:
    """The transport as one request's cycle sees it: the status line and headers are written
    with the body's first part, in one write, instead of in a write of their own. Each write
    is a system call here, a segment on the wire and a wake-up of the client: for a small
    answer (a job), the second costs about as much as the rest of sending it."""

    __slots__ = ("_cycle", "_headers_seen", "_held", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: Any) -> None:
        self._transport = transport
        self._cycle = cycle
        self._held: bytes | None = None
        self._headers_seen = False

    def write(self, data: bytes) -> None:
        if not self._headers_seen and self._cycle.response_started:
            # The first write once the response has started is its status line and headers
            # (an earlier one, "100 Continue", goes out at once).
            self._headers_seen = True
            self._held = data
            return
        held, self._held = self._held, None
        if held is not None:
            if len(data) > _JOIN_AT_MOST:  # a large body: a copy of it would cost more
                self._transport.write(held)
            else:
                data = held + data
        self._transport.write(data)

    def close(self) -> None:
        if self._held is not None and not self._transport.is_closing():
            self._transport.write(self._held)  # a response cut short: what it had, then close
        self._held = None
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _header_too_large(settings: Settings) -> tuple[int, str, str]:
    return (
        431,
        "request_header_fields_too_large",
        f"the request line and headers exceed {settings.http_max_header_bytes} bytes",
    )


def _reason(exc: Exception) -> str:
    # httptools' messages name the framing error ("Invalid header value char", ...).
    text = str(exc).strip()
    return text[:200] if text.isprintable() else "malformed request"


def protocol_for(settings: Settings) -> type[JobqHttpProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to these settings."""
    return type("JobqHttpProtocol", (JobqHttpProtocol,), {"settings": settings})


def uvicorn_server(asgi: Any, host: str, port: int, settings: Settings) -> Any:
    """The server `jobq api` and `jobq dev` run: uvicorn's, without its signal handlers (the
    caller's stop the worker of `jobq dev` too), and whose shutdown first answers every wait
    (`GET /jobs/{id}?wait=`) with the job as it is: otherwise a shutdown lasts as long as the
    longest wait, up to JOBQ_WAIT_MAX_SECONDS."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def shutdown(self, sockets: Any = None) -> None:
            queue = getattr(getattr(asgi, "state", None), "queue", None)
            if queue is not None:
                queue.end_waits()
            await super().shutdown(sockets)

    return Server(uvicorn_config(asgi, host, port, settings))


def uvicorn_config(asgi: Any, host: str, port: int, settings: Settings) -> Any:
    """The uvicorn configuration `jobq api` and `jobq dev` serve with."""
    import uvicorn

    return uvicorn.Config(
        asgi,
        host=host,
        port=port,
        http=protocol_for(settings),
        # uvicorn types it int; call_later takes any number of seconds.
        timeout_keep_alive=settings.http_keepalive_seconds,  # type: ignore[arg-type]
        log_config=None,
        access_log=False,
        lifespan="on",
    )
