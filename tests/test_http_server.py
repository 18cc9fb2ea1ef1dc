"""The HTTP server's own limits, over real sockets against a real `jobq api` process: header
size, header and body time, idle keep-alive, open connections, and malformed framing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import orjson
import pytest

from jobq import Middleware, NewJob, Registry
from jobq.api.app import create_app
from jobq.api.server import _HeadersWithBody
from jobq.settings import Settings
from tests.helpers import wait_for
from tests.servers import serve_in_process, start_api, stop, wait_ready

MAX_HEADER_BYTES = 4096
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEPALIVE = 1.0
MAX_CONNECTIONS = 20
# Every wait below is on a condition; this only bounds how long a broken server can hang a test.
DEADLINE = 10.0


@pytest.fixture(scope="module")
def api(dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log = tmp_path_factory.mktemp("api") / "stderr.log"
    with log.open("wb") as err:
        proc, base = start_api(
            dsn,
            env={
                "JOBQ_HTTP_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
                "JOBQ_HTTP_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
                "JOBQ_HTTP_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
                "JOBQ_HTTP_KEEPALIVE_SECONDS": str(KEEPALIVE),
                "JOBQ_HTTP_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            },
            stdin=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            asyncio.run(wait_ready(base, proc))
            yield base, log
        finally:
            stop(proc)


@pytest.fixture
def base(api: tuple[str, Path]) -> str:
    return api[0]


@contextlib.asynccontextmanager
async def connect(base: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (fails at the deadline)."""
    return await asyncio.wait_for(reader.read(), DEADLINE)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def assert_problem(raw: bytes, status: int, error: str) -> dict[str, str]:
    got, headers, body = parse(raw)
    assert got == status, raw[:500]
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert headers["x-request-id"]
    problem = orjson.loads(body)
    assert problem["status"] == status
    assert problem["error"] == error
    assert problem["request_id"] == headers["x-request-id"]
    return headers


async def test_a_header_section_over_the_limit_is_431_and_the_connection_closes(
    base: str,
) -> None:
    async with connect(base) as (reader, writer):
        big = b"x" * MAX_HEADER_BYTES
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + big + b"\r\n\r\n")
        assert_problem(await read_to_eof(reader), 431, "request_header_fields_too_large")


async def test_one_endless_header_is_cut_off_before_the_server_buffers_it(base: str) -> None:
    async with connect(base) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Endless: ")
        sent = 0
        answer = asyncio.ensure_future(read_to_eof(reader))
        # 16 MB in 16 KiB writes, stopping as soon as the server answers.
        while not answer.done() and sent < 16 * 1024 * 1024:
            try:
                writer.write(b"y" * 16384)
                await writer.drain()
            except ConnectionError:
                break
            sent += 16384
            await asyncio.sleep(0)
        raw = await answer
    assert_problem(raw, 431, "request_header_fields_too_large")
    assert sent < 4 * 1024 * 1024


async def test_headers_within_the_limit_are_served(base: str) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"{base}/healthz", headers={"x-padding": "p" * (MAX_HEADER_BYTES - 500)}
        )
    assert response.status_code == 200


async def test_headers_sent_too_slowly_get_408_and_the_connection_closes(base: str) -> None:
    async with connect(base) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")
        assert_problem(await read_to_eof(reader), 408, "request_timeout")


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    base: str,
) -> None:
    async with connect(base) as (reader, _):
        assert await read_to_eof(reader) == b""


async def test_a_body_sent_too_slowly_gets_408_and_nothing_is_stored(
    base: str, api: tuple[str, Path]
) -> None:
    async with connect(base) as (reader, writer):
        writer.write(
            b"POST /jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\nX-Request-Id: slow-body-1\r\n\r\n"
            b'{"kind": "echo", "pay'
        )
        headers = assert_problem(await read_to_eof(reader), 408, "request_timeout")
    assert headers["x-request-id"] == "slow-body-1"
    async with httpx.AsyncClient() as client:
        jobs = (await client.get(f"{base}/jobs", params={"kind": "echo"})).json()["jobs"]
    assert jobs == []
    assert "Traceback" not in api[1].read_text()


def _counter(metrics_text: str, labels: str) -> float:
    prefix = f"jobq_http_requests_total{{{labels}}} "
    return sum(float(line[len(prefix) :]) for line in metrics_text.splitlines()
               if line.startswith(prefix))  # fmt: skip


async def test_a_body_timeout_is_counted_and_logged_once_as_408_not_also_as_a_disconnect(
    base: str, api: tuple[str, Path]
) -> None:
    timed_out = 'method="POST",route="unmatched",status="408"'
    disconnected = 'method="POST",route="/jobs",status="499"'
    async with httpx.AsyncClient() as client:
        before = (await client.get(f"{base}/metrics")).text
        async with connect(base) as (reader, writer):
            writer.write(
                b"POST /jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\nX-Request-Id: slow-body-once\r\n\r\n{"
            )
            assert_problem(await read_to_eof(reader), 408, "request_timeout")

        async def counted() -> str:
            text = (await client.get(f"{base}/metrics")).text
            return text if _counter(text, timed_out) > _counter(before, timed_out) else ""

        after = await wait_for(counted, timeout=DEADLINE)
        # The application saw the disconnect before the 408 went out; a request after it
        # is served only once the event loop has handled that.
        after = (await client.get(f"{base}/metrics")).text
    assert _counter(after, timed_out) == _counter(before, timed_out) + 1
    assert _counter(after, disconnected) == _counter(before, disconnected)
    assert "client disconnected" not in api[1].read_text().split("slow-body-once", 1)[-1]


async def test_an_idle_keep_alive_connection_is_closed(base: str) -> None:
    async with connect(base) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        raw = await read_to_eof(reader)  # the response, then the close
    status, _, body = parse(raw)
    assert status == 200
    assert orjson.loads(body) == {"status": "ok"}


async def test_pipelined_requests_on_one_connection_are_all_answered(base: str) -> None:
    async with connect(base) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 3)
        raw = await read_to_eof(reader)
    assert raw.count(b"HTTP/1.1 200 OK") == 3


def test_an_answer_goes_out_in_one_write_with_its_status_line_and_headers() -> None:
    writes: list[bytes] = []

    class Transport:
        def write(self, data: bytes) -> None:
            writes.append(data)

        def is_closing(self) -> bool:
            return False

    cycle = SimpleNamespace(response_started=False)
    transport = _HeadersWithBody(Transport(), cycle)  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # before the answer: sent at once
    assert writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    cycle.response_started = True
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert len(writes) == 1
    transport.write(b"{}")
    assert writes[1:] == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]


def test_a_large_answer_is_not_copied_to_join_its_headers() -> None:
    writes: list[bytes] = []
    cycle = SimpleNamespace(response_started=True)
    transport = _HeadersWithBody(SimpleNamespace(write=writes.append), cycle)  # type: ignore[arg-type]
    body = b"x" * (1 << 20)
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(body)
    assert writes[0] == b"HTTP/1.1 200 OK\r\n\r\n" and writes[1] is body


async def test_a_client_that_expects_100_continue_gets_it_before_it_sends_the_body(
    base: str,
) -> None:
    body = b'{"kind": "echo"}'
    async with connect(base) as (reader, writer):
        writer.write(
            b"POST /jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        line = await asyncio.wait_for(reader.readline(), DEADLINE)
        assert line == b"HTTP/1.1 100 Continue\r\n"
        assert await asyncio.wait_for(reader.readline(), DEADLINE) == b"\r\n"
        writer.write(body)
        status = await asyncio.wait_for(reader.readline(), DEADLINE)
        assert status.split()[1] in (b"201", b"422")  # answered, whatever the kind


async def test_connections_beyond_the_limit_get_503_with_retry_after(base: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        # The server's own readiness polls may hold a connection or two: fill up to the limit.
        held = [await stack.enter_async_context(connect(base)) for _ in range(MAX_CONNECTIONS)]
        async with connect(base) as (reader, _):
            raw = await read_to_eof(reader)
        headers = assert_problem(raw, 503, "too_many_connections")
        assert headers["retry-after"].isdigit()
        assert len(held) == MAX_CONNECTIONS
    async with httpx.AsyncClient() as client:

        async def served() -> bool:
            return (await client.get(f"{base}/healthz")).status_code == 200

        await wait_for(served, timeout=DEADLINE)


@pytest.mark.parametrize(
    "request_head",
    [
        b"POST /jobs HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n",
        b"POST /jobs HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        b"GET /jobs HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n",
        b"BREW\x01 /jobs HTTP/1.1\r\nHost: t\r\n",
    ],
    ids=["negative Content-Length", "Content-Length and chunked", "space in a name", "bad method"],
)
async def test_malformed_framing_is_a_400_problem_document_with_a_request_id(
    base: str, request_head: bytes
) -> None:
    async with connect(base) as (reader, writer):
        writer.write(request_head + b"\r\n")
        assert_problem(await read_to_eof(reader), 400, "bad_request")


async def test_a_client_that_disconnects_mid_body_leaves_no_error_and_no_5xx(
    base: str, api: tuple[str, Path]
) -> None:
    for _ in range(3):
        async with connect(base) as (_, writer):
            writer.write(
                b"POST /jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"kind": "ec'
            )
            await writer.drain()
    async with httpx.AsyncClient() as client:

        async def counted() -> str:
            text = (await client.get(f"{base}/metrics")).text
            return text if 'status="499"' in text else ""

        text = await wait_for(counted, timeout=DEADLINE)
    assert 'route="/jobs",status="499"' in text
    assert 'status="500"' not in text
    log = api[1].read_text()
    assert "Traceback" not in log
    assert "ERROR" not in log


# -- an internal error -----------------------------------------------------------------------

SECRET = "/srv/secret/config.py"


class _BrokenEnqueue(Middleware):
    """A bug in an application's middleware: enqueueing kind `broken` raises."""

    async def enqueue(self, jobs: list[NewJob], call_next: Any) -> list[uuid.UUID]:
        if jobs[0].kind == "broken":
            raise RuntimeError(f"bug in {SECRET}")
        ids: list[uuid.UUID] = await call_next(jobs)
        return ids


@pytest.fixture(scope="module")
async def broken_api(dsn: str) -> AsyncIterator[str]:
    registry = Registry()
    registry.use(_BrokenEnqueue())

    @registry.handler("broken")
    async def broken(ctx: Any, payload: Any) -> None: ...

    settings = Settings()
    async with serve_in_process(create_app(settings, dsn=dsn, registry=registry), settings) as b:
        yield b


async def test_after_an_internal_error_the_connection_serves_the_next_request(
    broken_api: str,
) -> None:
    opened: list[str] = []

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            opened.append(event)

    async with httpx.AsyncClient(base_url=broken_api) as client:
        failed = await client.post("/jobs", json={"kind": "broken"}, extensions={"trace": trace})
        after = await client.get("/healthz", extensions={"trace": trace})
    assert (failed.status_code, after.status_code) == (500, 200)
    assert len(opened) == 1


async def test_an_internal_error_is_a_500_problem_document_that_shows_nothing_of_it(
    broken_api: str,
) -> None:
    async with httpx.AsyncClient(base_url=broken_api) as client:
        response = await client.post("/jobs", json={"kind": "broken"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (problem["error"], problem["instance"]) == ("internal_error", "/jobs")
    assert problem["request_id"] == response.headers["x-request-id"]
    assert SECRET not in response.text
    assert "Traceback" not in response.text


async def test_an_internal_error_is_logged_once_with_its_traceback_and_request_id(
    broken_api: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with httpx.AsyncClient(base_url=broken_api) as client:
        response = await client.post(
            "/jobs", json={"kind": "broken"}, headers={"x-request-id": "broken-once"}
        )
        await client.get("/healthz")  # the server is done with the first request
    assert response.status_code == 500
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].exc_info is not None
    assert getattr(logged[0], "request_id", None) == "broken-once"
