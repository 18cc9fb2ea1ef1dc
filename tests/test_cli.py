"""The `jobq` command as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest

from jobq.embedded import EmbeddedPostgres
from jobq.queue import Queue
from tests.helpers import ALL_JOBS, ROOT, wait_for
from tests.servers import wait_ready


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


@pytest.fixture(scope="module")
def embedded_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where `jobq dev` (and commands beside it) keep the embedded server's data."""
    return tmp_path_factory.mktemp("dev") / "jobq"


def _without_database_url() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}


@pytest.mark.timeout(180)
async def test_dev_runs_everything_with_no_configuration(embedded_data_dir: Path) -> None:
    """What `make run` does: embedded database, migrations, API and worker; Ctrl-C stops it."""
    tmp_path = embedded_data_dir.parent
    port = free_port()
    env = _without_database_url()
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
        await wait_ready(base, proc, timeout=90)  # a first start initialises the database
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
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
        assert "database  embedded PostgreSQL in " in output
        # The embedded server stopped with it: its pid file is gone.
        assert not list((tmp_path / "jobq").glob("pg*/postmaster.pid"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.timeout(180)
def test_a_one_shot_command_on_the_embedded_database_prints_no_info_lines(
    embedded_data_dir: Path,
) -> None:
    env = {"JOBQ_DATA_DIR": str(embedded_data_dir)}
    first = subprocess.run(
        [sys.executable, "-m", "jobq", "migrate"],
        env=_without_database_url() | env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert first.returncode == 0, first.stderr  # may say once that it initialised the server

    result = subprocess.run(
        [sys.executable, "-m", "jobq", "status"],
        env=_without_database_url() | env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "queue" in result.stdout


# -- one clear line for every error ----------------------------------------------------------


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


async def test_enqueue_with_a_key_reused_for_another_payload_says_so_in_one_line(
    queue: Queue, dsn: str
) -> None:
    env = {"DATABASE_URL": dsn}
    first = jobq("enqueue", "echo", "--idempotency-key", "k1", "--payload", '{"n": 1}', env=env)
    assert first.returncode == 0, first.stderr

    again = jobq("enqueue", "echo", "--idempotency-key", "k1", "--payload", '{"n": 2}', env=env)

    assert again.returncode == 2
    assert "idempotency key 'k1' was already used" in _one_error_line(again)
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 1


async def test_worker_names_the_attribute_a_module_does_not_have(dsn: str) -> None:
    result = jobq("worker", "jobq.examples:nosuch", env={"DATABASE_URL": dsn})
    assert result.returncode == 2
    assert _one_error_line(result) == "error: module jobq.examples has no attribute nosuch"


@pytest.mark.parametrize("queues", ["", " , "])
def test_worker_refuses_queues_that_name_no_queue(queues: str) -> None:
    result = jobq("worker", "jobq.examples:registry", "--queues", queues)
    assert result.returncode == 2
    assert "--queues names no queue" in _one_error_line(result)


async def test_enqueue_with_app_refuses_an_unknown_kind_as_the_api_does(
    queue: Queue, dsn: str
) -> None:
    result = jobq("enqueue", "nosuchkind", "--app", "jobq.examples:registry",
                  env={"DATABASE_URL": dsn})  # fmt: skip
    assert result.returncode == 2
    assert "no handler for kind 'nosuchkind'; known kinds: echo" in _one_error_line(result)
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 0


async def test_enqueue_with_app_refuses_a_payload_that_does_not_fit_the_handler(
    queue: Queue, dsn: str
) -> None:
    env = {"DATABASE_URL": dsn}
    bad = jobq("enqueue", "flaky", "--payload", '{"fail_times": "often"}',
               "--app", "jobq.examples:registry", env=env)  # fmt: skip
    good = jobq("enqueue", "flaky", "--payload", '{"fail_times": 1}',
                "--app", "jobq.examples:registry", env=env)  # fmt: skip
    assert bad.returncode == 2
    assert "the payload does not fit 'flaky': fail_times:" in _one_error_line(bad)
    assert good.returncode == 0, good.stderr
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 1


@pytest.mark.parametrize("run_at", ["2030-01-01T09:00:00", "2030-01-01", "1700000000"])
def test_enqueue_refuses_a_run_at_without_an_offset(run_at: str) -> None:
    result = jobq("enqueue", "echo", "--run-at", run_at)
    assert result.returncode == 2
    assert "is not an RFC 3339 time with an offset" in _one_error_line(result)


async def test_enqueue_takes_a_run_at_with_an_offset_as_that_instant(
    queue: Queue, dsn: str
) -> None:
    result = jobq("enqueue", "echo", "--run-at", "2030-01-01T10:00:00+01:00",
                  env={"DATABASE_URL": dsn})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["run_at"].startswith("2030-01-01T09:00:00")


# -- help and output -----------------------------------------------------------------------

COMMANDS = [
    "migrate",
    "api",
    "worker",
    "dev",
    "enqueue",
    "enqueue-file",
    "status",
    "prune",
    "chaos",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_every_option_in_full_without_type_noise(command: str) -> None:
    result = jobq(command, "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    assert "<bool>" not in result.stdout and "range>" not in result.stdout
    assert "…" not in result.stdout  # nothing truncated
    assert "--help  " in result.stdout or "--help\n" in result.stdout


def test_chaos_help_shows_each_option_name_whole() -> None:
    result = jobq("chaos", "--help", env={"COLUMNS": "80"})
    for name in ["--jobs", "--workers", "--concurrency", "--kill-interval",
                 "--restart-database / --no-restart-database", "--timeout", "--seed"]:  # fmt: skip
        assert name in result.stdout


async def test_migrate_prints_each_step_once(admin_dsn: str) -> None:
    import asyncpg

    from tests.conftest import with_database

    name = "jobq_test_blank_" + os.urandom(3).hex()
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
        result = jobq("migrate", env={"DATABASE_URL": with_database(admin_dsn, name)})
    finally:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.close()
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert output.count("0001_jobs") == 1, output
    assert "[1/" in result.stdout and "applied" in result.stdout


@pytest.mark.timeout(180)
async def test_ctrl_c_on_dev_lets_running_jobs_finish_and_stops_the_database_last(
    tmp_path: Path,
) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group, as `os.killpg` does."""
    port = free_port()
    data_dir = tmp_path / "jobq"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env |= {"JOBQ_DATA_DIR": str(data_dir), "JOBQ_POLL_INTERVAL_SECONDS": "0.2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobq", "dev", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, like a terminal's foreground job
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(base, proc, timeout=90)  # a first start initialises the database
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            created = await client.post("/jobs", json={"kind": "sleep", "payload": {"seconds": 1}})
            job_id = created.json()["id"]

            async def running() -> bool:
                return (await client.get(f"/jobs/{job_id}")).json()["status"] == "running"

            await wait_for(running, timeout=30)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "not written" not in output, output
    assert not list(data_dir.glob("pg*/postmaster.pid"))
    # The server shut down after its clients had left: it did not have to cut anyone off.
    pg_log = next(data_dir.glob("pg*.log")).read_text()
    assert "terminating connection due to administrator command" not in pg_log
    server = EmbeddedPostgres(data_dir)
    conn = await asyncpg.connect(server.start())
    try:
        row = await conn.fetchrow(f"SELECT status, attempts FROM {ALL_JOBS} WHERE id = $1", job_id)
    finally:
        await conn.close()
        server.stop()
    assert (row["status"], row["attempts"]) == ("succeeded", 1)


async def test_pause_by_stores_who_paused_and_status_shows_it(queue: Queue, dsn: str) -> None:
    paused = jobq("pause", "reports", "--by", "Ana", env={"DATABASE_URL": dsn})
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout)["paused_by"] == "Ana"
    from jobq import stats

    assert "reports (paused by Ana)" in stats.render_text(await stats.collect(queue))
