"""A real `jobq api` server in a child process, for tests that talk HTTP over a socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx

from jobq.api.server import uvicorn_server
from jobq.settings import Settings
from tests.helpers import ROOT, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_api(
    dsn: str, *args: str, env: dict[str, str] | None = None, **popen: Any
) -> tuple[subprocess.Popen[bytes], str]:
    """`jobq api` on a free port against `dsn`; returns the process and its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobq", "api", "--port", str(port), *args],
        env={
            **os.environ,
            "DATABASE_URL": dsn,
            "JOBQ_LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
            **(env or {}),
        },
        cwd=ROOT,
        **popen,
    )
    return proc, f"http://127.0.0.1:{port}"


async def wait_ready(
    base: str, proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 30
) -> None:
    async def ready() -> bool:
        assert proc.poll() is None, "the API server exited"
        try:
            async with httpx.AsyncClient() as c:
                return (await c.get(f"{base}/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(ready, timeout=timeout, interval=0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def serve_in_process(asgi: Any, settings: Settings) -> AsyncIterator[str]:
    """`asgi` served on this event loop by the server `jobq api` uses (its protocol, limits
    and lifespan) on a free port: a real socket without a child process. Yields the base URL."""
    port = free_port()
    server = uvicorn_server(asgi, "127.0.0.1", port, settings)
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        assert not task.done(), "the server stopped"
        return server.started

    try:
        await wait_for(started, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
