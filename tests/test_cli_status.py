"""`jobq status` and `jobq enqueue-file`, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from jobq.queue import NewJob, Queue
from tests.helpers import ROOT


def jobq(dsn: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobq", *args],
        env={**os.environ, "DATABASE_URL": dsn, "JOBQ_LOG_LEVEL": "WARNING"},
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_status_prints_counts_by_queue_and_status(queue: Queue, dsn: str) -> None:
    for _ in range(3):
        await queue.enqueue(NewJob(kind="echo", queue="mail"))
    await queue.enqueue(NewJob(kind="echo"))

    result = jobq(dsn, "status")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "queue",
        "queued",
        "running",
        "retrying",
        "succeeded",
        "failed_permanent",
        "cancelled",
        "total",
        "oldest",
        "due",
    ]
    mail = next(line for line in lines if line.startswith("mail "))
    assert mail.split()[1:8] == ["3", "0", "0", "0", "0", "0", "3"]
    assert "no worker handles: echo in queue mail (3 waiting)" in result.stdout
    assert "throughput:" in result.stdout


async def test_enqueue_file_enqueues_every_line(queue: Queue, dsn: str, tmp_path: Path) -> None:
    lines = [orjson.dumps({"kind": "echo", "payload": {"n": i}}).decode() for i in range(1200)]
    lines.insert(600, "")  # blank lines are skipped
    lines.append(orjson.dumps({"kind": "other", "queue": "bulk", "priority": 5}).decode())
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")

    result = jobq(dsn, "enqueue-file", str(path), "--batch-size", "500")

    assert result.returncode == 0, result.stderr
    assert "enqueued 1201 job(s)" in result.stdout
    counts = {(q, s): n for q, s, n in await queue.counts()}
    assert counts == {("default", "queued"): 1200, ("bulk", "queued"): 1}


async def test_enqueue_file_stores_nothing_when_a_line_is_invalid(queue: Queue, dsn: str) -> None:
    stdin = '{"kind": "echo"}\n{"kind": "echo", "priority": "high"}\n'

    result = jobq(dsn, "enqueue-file", "-", stdin=stdin)

    assert result.returncode == 2
    assert "line 2" in result.stderr
    assert await queue.counts() == []


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def _lines(n: int, last_key: str) -> str:
    """n jobs: the first n - 1 without a key, the last one with `last_key`."""
    lines = [orjson.dumps({"kind": "echo", "payload": {"n": i}}).decode() for i in range(n - 1)]
    last = {"kind": "echo", "payload": {"n": n - 1}, "idempotency_key": last_key}
    return "\n".join([*lines, orjson.dumps(last).decode()]) + "\n"


async def test_enqueue_file_with_a_key_conflict_in_a_later_batch_stores_nothing(
    queue: Queue, dsn: str
) -> None:
    await queue.enqueue(NewJob(kind="echo", payload={"other": True}, idempotency_key="taken"))

    result = jobq(dsn, "enqueue-file", "-", "--batch-size", "500", stdin=_lines(601, "taken"))

    assert result.returncode == 2
    assert "line 601: idempotency key 'taken' was already used" in _one_error_line(result)
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 1


async def test_enqueue_file_rerun_after_a_fix_stores_each_job_once(queue: Queue, dsn: str) -> None:
    await queue.enqueue(NewJob(kind="echo", payload={"other": True}, idempotency_key="taken"))
    broken = jobq(dsn, "enqueue-file", "-", "--batch-size", "500", stdin=_lines(601, "taken"))
    assert broken.returncode == 2

    fixed = jobq(dsn, "enqueue-file", "-", "--batch-size", "500", stdin=_lines(601, "fresh"))

    assert fixed.returncode == 0, fixed.stderr
    assert "enqueued 601 job(s)" in fixed.stdout
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 1 + 601


async def test_enqueue_file_with_two_lines_sharing_a_key_for_different_jobs_stores_nothing(
    queue: Queue, dsn: str
) -> None:
    stdin = (
        '{"kind": "echo", "payload": {"n": 1}, "idempotency_key": "same"}\n'
        '{"kind": "echo", "payload": {"n": 2}, "idempotency_key": "same"}\n'
    )

    result = jobq(dsn, "enqueue-file", "-", "--batch-size", "1", stdin=stdin)

    assert result.returncode == 2
    assert "idempotency key 'same'" in _one_error_line(result)
    assert await queue.counts() == []


async def test_enqueue_file_names_both_lines_of_a_key_given_to_two_jobs_and_no_unstored_job(
    queue: Queue, dsn: str
) -> None:
    stdin = (
        '{"kind": "echo", "payload": {"n": 1}, "idempotency_key": "same"}\n'
        "\n"
        '{"kind": "echo", "payload": {"n": 2}, "idempotency_key": "same"}\n'
    )

    for batch_size in ("1", "500"):  # across batches and within one
        result = jobq(dsn, "enqueue-file", "-", "--batch-size", batch_size, stdin=stdin)

        assert result.returncode == 2
        assert _one_error_line(result) == (
            "error: line 3: idempotency key 'same' is also on line 1, for a different job"
        )


async def test_enqueue_file_counts_jobs_already_stored_apart_from_new_ones(
    queue: Queue, dsn: str
) -> None:
    keyed = "".join(
        orjson.dumps({"kind": "echo", "payload": {"n": i}, "idempotency_key": f"k{i}"}).decode()
        + "\n"
        for i in range(10)
    )
    first = jobq(dsn, "enqueue-file", "-", "--batch-size", "500", stdin=keyed)
    assert first.stdout.strip() == "enqueued 10 job(s)", first.stderr

    again = jobq(dsn, "enqueue-file", "-", "--batch-size", "4", stdin=keyed)

    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (
        "enqueued 0 job(s); 10 already stored with the same idempotency key"
    )
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 10


async def test_enqueue_file_names_the_line_and_column_of_a_json_error(
    queue: Queue, dsn: str
) -> None:
    stdin = '{"kind": "echo"}\n{"kind": "echo"}\n{"kind": "echo"\n'

    result = jobq(dsn, "enqueue-file", "-", stdin=stdin)

    assert result.returncode == 2
    assert _one_error_line(result).startswith("error: line 3 column 16: not JSON")
    assert await queue.counts() == []


async def test_enqueue_file_accepts_a_file_that_starts_with_a_byte_order_mark(
    queue: Queue, dsn: str, tmp_path: Path
) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"kind": "echo"}\r\n{"kind": "echo"}\r\n'.encode())

    result = jobq(dsn, "enqueue-file", str(path))

    assert result.returncode == 0, result.stderr
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 2


async def test_enqueue_file_names_the_line_that_is_not_utf8(
    queue: Queue, dsn: str, tmp_path: Path
) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"kind": "echo"}\n{"kind": "caf\xe9"}\n')

    result = jobq(dsn, "enqueue-file", str(path))

    assert result.returncode == 2
    assert _one_error_line(result) == "error: line 2 column 14: not valid UTF-8"
    assert await queue.counts() == []


async def test_enqueue_file_with_app_refuses_a_kind_no_handler_takes(
    queue: Queue, dsn: str
) -> None:
    stdin = '{"kind": "echo"}\n{"kind": "nosuch"}\n'

    result = jobq(dsn, "enqueue-file", "-", "--app", "jobq.examples:registry", stdin=stdin)

    assert result.returncode == 2
    assert _one_error_line(result).startswith("error: line 2: no handler for kind 'nosuch'")
    assert await queue.counts() == []
