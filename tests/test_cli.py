"""The `jobq` command as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from jobq.queue import Queue
from tests.helpers import ROOT, wait_for


def jobq(
    *args: str, env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobq", *args],
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kw,  # type: ignore[arg-type]
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_enqueue_prints_the_job_as_json(queue: Queue, dsn: str) -> None:
    result = jobq("enqueue", "echo", "--payload", '{"n": 1}', "--priority", "2",
                  env={"DATABASE_URL": dsn})  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert (job["kind"], job["payload"], job["priority"], job["status"]) == (
        "echo", {"n": 1}, 2, "queued",
    )  # fmt: skip
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 1


async def test_enqueue_without_max_attempts_leaves_it_to_the_handler(
    queue: Queue, dsn: str
) -> None:
    result = jobq("enqueue", "echo", env={"DATABASE_URL": dsn})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["max_attempts"] is None
    assert await queue.pool.fetchval("SELECT max_attempts FROM jobs") is None


async def test_enqueue_rejects_a_payload_that_is_not_json(dsn: str) -> None:
    result = jobq("enqueue", "echo", "--payload", "{nope", env={"DATABASE_URL": dsn})
    assert result.returncode != 0
    assert "not JSON" in result.stderr


async def test_migrate_reports_an_up_to_date_schema(dsn: str) -> None:
    result = jobq("migrate", env={"DATABASE_URL": dsn})
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


async def test_worker_refuses_a_spec_that_is_not_a_registry(dsn: str) -> None:
    result = jobq("worker", "jobq.examples:sleep", env={"DATABASE_URL": dsn})
    assert result.returncode != 0
    assert "not a jobq Registry" in result.stderr


@pytest.mark.timeout(180)
async def test_dev_runs_everything_with_no_configuration(tmp_path: Path) -> None:
    """What `make run` does: embedded database, migrations, API and worker; Ctrl-C stops it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env |= {"JOBQ_DATA_DIR": str(tmp_path / "jobq"), "JOBQ_POLL_INTERVAL_SECONDS": "0.2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobq", "dev", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:

            async def ready() -> bool:
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, timeout=90, interval=0.2)
            created = await client.post("/jobs", json={"kind": "echo", "payload": {"v": 1}})
            assert created.status_code == 201
            job_id = created.json()["id"]

            async def succeeded() -> bool:
                return (await client.get(f"/jobs/{job_id}")).json()["status"] == "succeeded"

            await wait_for(succeeded, timeout=30)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, output
        assert f"{base}/docs" in output and f"{base}/metrics" in output
        # The embedded server stopped with it: its pid file is gone.
        assert not list((tmp_path / "jobq").glob("pg*/postmaster.pid"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
