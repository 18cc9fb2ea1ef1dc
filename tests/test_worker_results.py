"""What a worker writes back for a handler's return value, and what it does with a value that
cannot be stored."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest

from jobq import db, schema
from jobq.queue import NewJob, Queue, lease_of
from jobq.registry import JobContext, Registry
from tests.conftest import create_database, drop_database, with_database
from tests.helpers import NO_JOBS, wait_for, worker_process
from tests.test_worker import FAST, finished, running


async def test_a_handlers_return_value_is_stored_as_that_json_value(queue: Queue, dsn: str) -> None:
    payload = {"text": "hi", "items": [1, 2.5, None], "nested": {"ok": True}}
    job = (await queue.enqueue(NewJob(kind="echo", payload=payload))).job
    proc = worker_process(dsn, "tests.reliab_handlers:registry")
    try:

        async def succeeded() -> bool:
            return (await queue.get(job.id)).status == "succeeded"

        await wait_for(succeeded, timeout=30)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert (await queue.get(job.id)).result == payload


UNSTORABLE: dict[str, Any] = {
    "set": {1, 2},
    "bytes": b"raw",
    "int beyond 64 bits": 2**70,
    "NUL character": "a\x00b",
    "NaN": float("nan"),
    "Infinity": float("inf"),
    "nested -Infinity": {"scores": [1.0, float("-inf")]},
}


async def test_a_result_that_cannot_be_stored_fails_its_job_once_permanently_with_the_reason(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()
    runs: list[str] = []

    @registry.handler("unstorable")
    async def unstorable(ctx: JobContext, payload: dict[str, Any]) -> Any:
        runs.append(payload["case"])
        return UNSTORABLE[payload["case"]]

    jobs = [
        (await queue.enqueue(NewJob(kind="unstorable", payload={"case": c}, max_attempts=3))).job
        for c in UNSTORABLE
    ]
    async with running(dsn, registry, concurrency=len(jobs)):
        done = [await finished(queue, j.id) for j in jobs]
    assert sorted(runs) == sorted(UNSTORABLE)  # each ran once
    for job in done:
        assert (job.status, job.attempts) == ("failed_permanent", 1), job.payload
        assert (job.last_error or "").startswith("result not stored: the result "), job.last_error
        assert job.result is None


async def test_a_result_larger_than_the_payload_bound_fails_its_job_once_permanently(
    queue: Queue, dsn: str
) -> None:
    registry = Registry()
    runs: list[int] = []

    @registry.handler("large")
    async def large(ctx: JobContext, payload: dict[str, Any]) -> str:
        runs.append(1)
        return "x" * 5000

    job = (await queue.enqueue(NewJob(kind="large", max_attempts=3))).job
    settings = dataclasses.replace(FAST, max_payload_bytes=4096)
    async with running(dsn, registry, settings):
        done = await finished(queue, job.id)
    assert runs == [1]
    assert (done.status, done.attempts, done.result) == ("failed_permanent", 1, None)
    assert (done.last_error or "").startswith("result not stored: the result is 5002 bytes")


# -- a result the database itself refuses --------------------------------------------------


@pytest.fixture(scope="module")
async def latin1_dsn(admin_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    """A database whose encoding (LATIN1) cannot represent most of Unicode, migrated."""
    name = await create_database(
        admin_dsn, "latin1", template="template0",
        options="ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'",
    )  # fmt: skip
    dsn = with_database(admin_dsn, name)
    mconn = await db.connect(dsn)
    try:
        await schema.migrate(mconn)
    finally:
        await mconn.close()
    try:
        yield dsn
    finally:
        await drop_database(admin_dsn, name)


@pytest.fixture
async def latin1_queue(latin1_dsn: str) -> AsyncIterator[Queue]:
    pool = await db.create_pool(latin1_dsn, min_size=1, max_size=4)
    try:
        await pool.execute(NO_JOBS)
        yield Queue(pool)
    finally:
        await pool.close()


async def test_a_result_the_database_refuses_fails_only_its_own_job_and_the_rest_land(
    latin1_queue: Queue, latin1_dsn: str
) -> None:
    queue = latin1_queue
    registry = Registry()
    runs: list[int] = []

    @registry.handler("answer")
    async def answer(ctx: JobContext, payload: dict[str, Any]) -> str:
        runs.append(payload["n"])
        return "日本語" if payload["n"] == 3 else f"answer {payload['n']}"  # LATIN1 has no 日

    ids = await queue.enqueue_many(
        [NewJob(kind="answer", payload={"n": n}, max_attempts=3) for n in range(8)]
    )
    async with running(latin1_dsn, registry, concurrency=8):
        done = {j.payload["n"]: j for j in [await finished(queue, i) for i in ids]}
    assert sorted(runs) == list(range(8))  # the refused one ran once, not max_attempts times
    assert {n: j.status for n, j in done.items() if j.status != "succeeded"} == {
        3: "failed_permanent"
    }
    assert (done[3].last_error or "").startswith("result not stored: character with byte")
    assert all(done[n].result == f"answer {n}" for n in done if n != 3)


async def test_a_refused_row_in_a_completion_batch_leaves_the_other_rows_written(
    queue: Queue,
) -> None:
    await queue.enqueue_many([NewJob(kind="echo") for _ in range(5)])
    jobs = await queue.claim("w", ["echo"], ["default"], 5, lease_seconds=30)
    texts = ["1", "2", "{not json", "4", "5"]
    done = await queue.complete_many(
        (lease_of(j), text) for j, text in zip(jobs, texts, strict=True)
    )
    assert done.held == {j.id for j in jobs} - {jobs[2].id}
    assert list(done.refused) == [jobs[2].id]
    assert "invalid input syntax for type json" in done.refused[jobs[2].id]
    assert (await queue.get(jobs[2].id)).status == "running"  # the caller decides its fate
