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
