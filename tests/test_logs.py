"""Structured logs: readable text by default, JSON lines with JOBQ_LOG_FORMAT=json; job lines
carry job_id, kind, attempt and worker_id; payloads and tokens never reach the log."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import orjson

from jobq import logs
from jobq.queue import NewJob, Queue
from tests.helpers import wait_for, worker_process
from tests.servers import start_api, stop, wait_ready

SECRET = "pa55-in-payload"


def record(**extra: Any) -> logging.LogRecord:
    r = logging.LogRecord("jobq.worker", logging.WARNING, "", 1, "job failed: %s", ("E",), None)
    r.__dict__.update(extra)
    return r


def test_text_lines_show_the_message_then_the_fields() -> None:
    line = logs.TextFormatter().format(record(job_id="j1", kind="echo", attempt=2, worker_id="w"))
    assert line.endswith("jobq.worker: job failed: E job_id=j1 kind=echo attempt=2 worker_id=w")


def test_json_lines_hold_the_message_and_the_fields() -> None:
    entry = orjson.loads(logs.JsonFormatter().format(record(job_id="j1", kind="echo", attempt=2)))
    assert entry["msg"] == "job failed: E"
    assert (entry["level"], entry["logger"]) == ("warning", "jobq.worker")
    assert (entry["job_id"], entry["kind"], entry["attempt"]) == ("j1", "echo", 2)


def test_text_is_the_default_format() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure()
        assert isinstance(root.handlers[0].formatter, logs.TextFormatter)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def json_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


async def test_worker_job_lines_carry_job_fields_and_never_the_payload(
    queue: Queue, dsn: str, tmp_path: Path
) -> None:
    failing = (await queue.enqueue(NewJob(kind="flaky", payload={"fail_times": 1}))).job
    echoed = (await queue.enqueue(NewJob(kind="echo", payload={"secret": SECRET}))).job
    log_path = tmp_path / "worker.log"
    env = {"JOBQ_LOG_FORMAT": "json", "JOBQ_LOG_LEVEL": "INFO", "JOBQ_RETRY_BASE_SECONDS": "0.01",
           "JOBQ_RETRY_CAP_SECONDS": "0.05"}  # fmt: skip
    with log_path.open("wb") as out:
        proc = worker_process(dsn, "jobq.examples:registry", env=env, stderr=out)
        try:

            async def both_done() -> bool:
                statuses = {(await queue.get(j.id)).status for j in (failing, echoed)}
                return statuses == {"succeeded"}

            await wait_for(both_done)
        finally:
            proc.terminate()
            proc.wait(timeout=15)

    entries = json_lines(log_path)
    job_lines = [e for e in entries if "job_id" in e]
    assert job_lines, entries
    for entry in job_lines:
        assert {"job_id", "kind", "attempt", "worker_id"} <= set(entry), entry
    assert any(e["job_id"] == str(failing.id) and e["attempt"] == 1 for e in job_lines)
    assert SECRET not in log_path.read_text()


async def test_api_logs_never_hold_bearer_tokens(dsn: str, tmp_path: Path) -> None:
    log_path = tmp_path / "api.log"
    env = {"JOBQ_LOG_FORMAT": "json", "JOBQ_LOG_LEVEL": "DEBUG", "JOBQ_API_TOKENS": "tok-valid-123"}
    with log_path.open("wb") as out:
        proc, base = start_api(dsn, env=env, stderr=out)
        try:
            await wait_ready(base, proc)
            async with httpx.AsyncClient(base_url=base) as client:
                ok = await client.get("/stats", headers={"Authorization": "Bearer tok-valid-123"})
                bad = await client.get("/stats", headers={"Authorization": "Bearer tok-wrong-456"})
                assert (ok.status_code, bad.status_code) == (200, 401)
        finally:
            stop(proc)

    text = log_path.read_text()
    entries = json_lines(log_path)
    assert any(e.get("request_id") for e in entries)  # requests were logged
    assert "tok-valid-123" not in text
    assert "tok-wrong-456" not in text
