"""Start-up with the database unreachable: `jobq api` serves 503 until it is back, `jobq worker`
waits with one log line, one-shot commands say what to check in one line and exit 1.

The API and worker tests stop and start a PostgreSQL server of their own (see
`owned_postgres`); the one-shot commands point at a port nothing listens on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from jobq import db
from jobq.embedded import EmbeddedPostgres
from jobq.queue import NewJob, Queue
from tests import owned_postgres
from tests.helpers import ROOT, wait_for, worker_process
from tests.servers import free_port, start_api, stop

own_server = owned_postgres.own_server
own_dsn = owned_postgres.own_dsn

UNREACHABLE = "cannot reach the database at"


@pytest.fixture
def database_down(own_server: EmbeddedPostgres, own_dsn: str) -> Iterator[EmbeddedPostgres]:
    """The database is stopped for the test and running again afterwards."""
    own_server.stop()
    try:
        yield own_server
    finally:
        if not (own_server.pgdata / "postmaster.pid").exists():
            own_server.start()


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def _wait_until_the_worker_waits(worker: subprocess.Popen[bytes], log: Path) -> None:
    async def waiting() -> bool:
        assert worker.poll() is None, _text(log)
        return UNREACHABLE in _text(log)

    await wait_for(waiting, timeout=60, interval=0.1)


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["enqueue", "echo"], None),
        (["status"], None),
        (["migrate"], None),
        (["enqueue-file", "-"], '{"kind": "echo"}\n'),
    ],
    ids=["enqueue", "status", "migrate", "enqueue-file"],
)
def test_a_one_shot_command_with_the_database_unreachable_prints_one_line_and_exits_1(
    args: list[str], stdin: str | None
) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "jobq", *args],
        env={**os.environ, "DATABASE_URL": f"postgresql://jobq:secret@127.0.0.1:{port}/jobq"},
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    line = result.stderr.strip()
    assert line.startswith(f"error: {UNREACHABLE} 127.0.0.1:{port}/jobq"), line
    assert "check DATABASE_URL" in line
    assert "secret" not in line  # the password never reaches a terminal or a log
    assert result.stdout == ""


@pytest.mark.timeout(120)
async def test_api_started_before_its_database_answers_503_then_serves_without_a_restart(
    database_down: EmbeddedPostgres, own_dsn: str, tmp_path: Path
) -> None:
    log = tmp_path / "api.log"
    with log.open("wb") as err:
        api, base = start_api(own_dsn, stderr=err)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:

            async def answering() -> httpx.Response | None:
                assert api.poll() is None, _text(log)
                try:
                    return await client.get("/readyz")
                except httpx.TransportError:
                    return None

            not_ready = await wait_for(answering, timeout=60, interval=0.1)
            assert not_ready.status_code == 503
            refused = await client.post("/jobs", json={"kind": "echo"})
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) > 0

            database_down.start()

            async def ready() -> bool:
                assert api.poll() is None, _text(log)
                return (await client.get("/readyz")).status_code == 200

            await wait_for(ready, timeout=30, interval=0.1)
            created = await client.post("/jobs", json={"kind": "echo"})
            assert created.status_code == 201
    finally:
        stop(api)
    output = _text(log)
    assert "Traceback" not in output
    assert output.count(UNREACHABLE) == 1, output


@pytest.mark.timeout(120)
async def test_worker_started_before_its_database_waits_with_one_log_line_then_runs_jobs(
    database_down: EmbeddedPostgres, own_dsn: str, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    with log.open("wb") as err:
        worker = worker_process(own_dsn, "jobq.examples:registry", stderr=err)
    try:
        await _wait_until_the_worker_waits(worker, log)
        database_down.start()
        pool = await db.create_pool(own_dsn, min_size=0, max_size=2)
        try:
            queue = Queue(pool)
            job = (await queue.enqueue(NewJob(kind="echo", payload={"after": "outage"}))).job

            async def succeeded() -> bool:
                return (await queue.get(job.id)).status == "succeeded"

            await wait_for(succeeded, timeout=30, interval=0.1)
        finally:
            await pool.close()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    output = _text(log)
    assert "Traceback" not in output
    assert output.count(UNREACHABLE) == 1, output


async def test_worker_stopped_while_it_waits_for_the_database_exits_0(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    dsn = f"postgresql://jobq@127.0.0.1:{free_port()}/jobq"
    with log.open("wb") as err:
        worker = worker_process(dsn, "jobq.examples:registry", stderr=err)
    try:
        await _wait_until_the_worker_waits(worker, log)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert "Traceback" not in _text(log)


@pytest.mark.timeout(120)
async def test_api_started_before_a_database_with_a_stale_schema_exits_1_once_it_is_reachable(
    own_server: EmbeddedPostgres, own_dsn: str, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(own_dsn)
    try:
        await conn.execute("DROP DATABASE IF EXISTS unmigrated")
        await conn.execute("CREATE DATABASE unmigrated")
    finally:
        await conn.close()
    own_server.stop()
    log = tmp_path / "api.log"
    try:
        with log.open("wb") as err:
            api, _ = start_api(own_server.dsn("unmigrated"), stderr=err)
        try:

            async def waiting() -> bool:
                assert api.poll() is None, _text(log)
                return UNREACHABLE in _text(log)

            await wait_for(waiting, timeout=60, interval=0.1)
            own_server.start()
            assert api.wait(timeout=60) == 1
        finally:
            if api.poll() is None:
                stop(api)
    finally:
        if not (own_server.pgdata / "postmaster.pid").exists():
            own_server.start()
    output = _text(log)
    assert "Traceback" not in output
    assert "the database schema is not up to date" in output and "jobq migrate" in output
