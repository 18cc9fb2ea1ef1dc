"""What a worker process writes back for a handler's return value."""

from __future__ import annotations

import subprocess

from jobq.queue import NewJob, Queue
from tests.helpers import wait_for, worker_process


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
