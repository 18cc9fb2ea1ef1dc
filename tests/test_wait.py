"""Waiting for a job: Queue.wait and GET /jobs/{id}?wait=, served by one LISTEN per process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from jobq.api import create_app
from jobq.queue import JOB_EVENTS_CHANNEL, Job, JobNotFound, Lease, NewJob, Queue, lease_of
from jobq.queue.progress import ProgressReport
from jobq.settings import Settings
from tests.helpers import wait_for
from tests.servers import serve_in_process
from tests.test_api import make_client


async def claimed(queue: Queue, n: int = 1) -> list[Job]:
    await queue.enqueue_many([NewJob("echo", {"i": i}) for i in range(n)])
    jobs = await queue.claim("w", ["echo"], ["default"], n, lease_seconds=30)
    assert len(jobs) == n
    return jobs


async def watched(queue: Queue, *ids: uuid.UUID) -> None:
    """Until every job is marked as waited on (the waiter is then sure to hear its end)."""

    async def marked() -> bool:
        n = await queue.pool.fetchval(
            "SELECT count(*) FROM jobs WHERE id = ANY($1::uuid[]) AND watched", list(ids)
        )
        return bool(n == len(ids))

    await wait_for(marked, timeout=10)


async def test_wait_returns_as_soon_as_the_job_ends(queue: Queue) -> None:
    (job,) = await claimed(queue)
    waiting = asyncio.create_task(queue.wait(job.id, timeout=30))
    await watched(queue, job.id)
    assert not waiting.done()
    assert await queue.complete(lease_of(job), {"ok": True})
    ended = await asyncio.wait_for(waiting, 10)  # long before its 30 s
    assert ended.status == "succeeded" and ended.result == {"ok": True}


async def test_wait_answers_the_current_state_when_the_time_is_up(queue: Queue) -> None:
    (job,) = await claimed(queue)
    assert (await queue.wait(job.id, timeout=0.2)).status == "running"


async def test_wait_for_a_job_that_already_ended_answers_at_once(queue: Queue) -> None:
    (job,) = await claimed(queue)
    await queue.complete(lease_of(job), 1)
    ended = await asyncio.wait_for(queue.wait(job.id, timeout=30), 5)
    assert ended.status == "succeeded"


async def test_wait_for_an_unknown_job_raises_not_found(queue: Queue) -> None:
    with pytest.raises(JobNotFound):
        await queue.wait(uuid.uuid4(), timeout=5)


async def test_wait_until_progress_answers_when_the_progress_changes(queue: Queue) -> None:
    (job,) = await claimed(queue)
    waiting = asyncio.create_task(queue.wait(job.id, timeout=30, until="progress"))
    await watched(queue, job.id)
    await asyncio.sleep(0.05)  # the waiter's first read is in: its baseline is "no progress"
    await queue.write_progress([ProgressReport(lease_of(job), 0.5, "half")])
    seen = await asyncio.wait_for(waiting, 10)
    assert seen.status == "running"
    assert seen.progress is not None and seen.progress["fraction"] == 0.5


LISTENING = "FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'"


async def test_many_waiters_share_one_listen_connection(queue: Queue) -> None:
    # The queues of earlier tests give their LISTEN connection back once nobody waits.
    await wait_for(lambda: queue.pool.fetchval(f"SELECT count(*) = 0 {LISTENING}"), timeout=10)
    jobs = await claimed(queue, 50)
    waiting = [asyncio.create_task(queue.wait(j.id, timeout=30)) for j in jobs]
    await watched(queue, *(j.id for j in jobs))
    assert await queue.pool.fetchval(f"SELECT count(*) {LISTENING}") == 1
    await queue.complete_many([(lease_of(j), "1") for j in jobs])
    ended = await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert {e.status for e in ended} == {"succeeded"}


async def test_a_job_nobody_waits_on_sends_no_notification_when_it_ends(
    queue: Queue, dsn: str
) -> None:
    heard: list[str] = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener(JOB_EVENTS_CHANNEL, lambda *a: heard.append(a[3]))
    try:
        (job,) = await claimed(queue)
        await queue.complete(lease_of(job), None)
        await listener.execute("SELECT 1")  # a round trip: a notification sent would be in
        await asyncio.sleep(0.2)
        assert heard == []
    finally:
        await listener.close()


async def test_a_waiter_is_answered_when_a_stale_lease_writes_nothing(queue: Queue) -> None:
    # A late completion from a run that lost its lease changes nothing: the waiter waits on.
    (job,) = await claimed(queue)
    waiting = asyncio.create_task(queue.wait(job.id, timeout=0.5))
    await watched(queue, job.id)
    assert not await queue.complete(Lease(job.id, uuid.uuid4()), "late")
    assert (await waiting).status == "running"


# -- over HTTP -----------------------------------------------------------------------------


@pytest.fixture
async def client(queue: Queue, pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(create_app(Settings(wait_max_seconds=30), pool=pool)) as c:
        yield c


async def test_get_with_wait_answers_when_the_job_ends(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    (job,) = await claimed(queue)
    waiting = asyncio.create_task(client.get(f"/jobs/{job.id}", params={"wait": 20}))
    await watched(queue, job.id)
    await queue.complete(lease_of(job), {"n": 1})
    r = await asyncio.wait_for(waiting, 10)
    assert r.status_code == 200
    assert r.json()["status"] == "succeeded" and r.json()["result"] == {"n": 1}


async def test_get_with_wait_answers_the_current_state_when_the_wait_is_over(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    (job,) = await claimed(queue)
    r = await client.get(f"/jobs/{job.id}", params={"wait": 0.2})
    assert r.status_code == 200 and r.json()["status"] == "running"


async def test_get_with_wait_until_progress_answers_on_progress(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    (job,) = await claimed(queue)
    waiting = asyncio.create_task(
        client.get(f"/jobs/{job.id}", params={"wait": 20, "until": "progress"})
    )
    await watched(queue, job.id)
    await asyncio.sleep(0.05)
    await queue.write_progress([ProgressReport(lease_of(job), 0.25, None)])
    r = await asyncio.wait_for(waiting, 10)
    assert r.json()["status"] == "running" and r.json()["progress"]["fraction"] == 0.25


@pytest.mark.parametrize(
    "params",
    [
        {"wait": "31"},
        {"wait": "-1"},
        {"wait": "nan"},
        {"wait": "inf"},
        {"wait": "soon"},
        {"wait": "1_0"},
        {"wait": " 1"},
        {"until": "progress"},
        {"wait": "1", "until": "forever"},
    ],
)
async def test_a_bad_wait_is_a_422_problem(
    client: httpx.AsyncClient, queue: Queue, params: dict[str, str]
) -> None:
    (job,) = await claimed(queue)
    r = await client.get(f"/jobs/{job.id}", params=params)
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["loc"][0] == "query"


async def test_get_with_wait_for_an_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/jobs/{uuid.uuid4()}", params={"wait": 5})
    assert r.status_code == 404


async def test_the_wait_parameter_is_documented_with_its_bound(client: httpx.AsyncClient) -> None:
    op = (await client.get("/openapi.json")).json()["paths"]["/jobs/{job_id}"]["get"]
    wait = next(p for p in op["parameters"] if p["name"] == "wait")
    assert 30 in [v.get("maximum") for v in wait["schema"].get("anyOf", [wait["schema"]])]
    assert {p["name"] for p in op["parameters"]} >= {"wait", "until"}


# -- a waiter whose client went away ------------------------------------------------------


@pytest.fixture(scope="module")
async def served(pool: asyncpg.Pool) -> AsyncIterator[tuple[str, FastAPI]]:
    """The API on a real socket, in this process: its waiters can be looked at."""
    settings = Settings(wait_max_seconds=60)
    app = create_app(settings, pool=pool)
    async with serve_in_process(app, settings) as base:
        yield base, app


async def test_a_waiter_whose_client_disconnects_is_dropped_at_once(
    served: tuple[str, FastAPI], queue: Queue
) -> None:
    base, app = served
    (job,) = await claimed(queue)
    waiters = app.state.queue._watcher.waiters
    host, port = base.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /jobs/{job.id}?wait=60 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    await writer.drain()

    async def waiting() -> bool:
        return job.id in waiters

    async def dropped() -> bool:
        return job.id not in waiters

    await wait_for(waiting, timeout=10)
    writer.close()
    await writer.wait_closed()
    await wait_for(dropped, timeout=5)  # not after the 60 s it asked for


async def test_under_another_server_a_waiter_whose_client_disconnects_is_dropped_too(
    pool: asyncpg.Pool, queue: Queue
) -> None:
    app = create_app(Settings(wait_max_seconds=60), pool=pool)
    (job,) = await claimed(queue)
    waiters = app.state.queue._watcher.waiters
    gone = asyncio.Event()
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": f"/jobs/{job.id}", "raw_path": f"/jobs/{job.id}".encode(),
        "query_string": b"wait=60", "headers": [(b"host", b"test")], "root_path": "",
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }  # fmt: skip
    call = asyncio.create_task(app(scope, receive, send))

    async def waiting() -> bool:
        return job.id in waiters

    await wait_for(waiting, timeout=10)
    gone.set()
    await asyncio.wait_for(call, 5)  # not after the 60 s it asked for
    assert job.id not in waiters
    assert sent[0]["status"] == 499


def _gauge(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    return float(line.split()[1])


async def test_the_waiters_gauge_counts_the_requests_waiting(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    (job,) = await claimed(queue)
    before = _gauge((await client.get("/metrics")).text, "jobq_waiters")
    waiting = asyncio.create_task(client.get(f"/jobs/{job.id}", params={"wait": 20}))
    await watched(queue, job.id)
    during = _gauge((await client.get("/metrics")).text, "jobq_waiters")
    await queue.complete(lease_of(job), None)
    assert (await asyncio.wait_for(waiting, 10)).status_code == 200
    after = _gauge((await client.get("/metrics")).text, "jobq_waiters")
    assert (during - before, after - before) == (1, 0)


async def test_shutting_down_answers_every_wait_at_once_with_the_job_as_it_is(
    pool: asyncpg.Pool, queue: Queue
) -> None:
    settings = Settings(wait_max_seconds=60)
    app = create_app(settings, pool=pool)
    (job,) = await claimed(queue)
    loop = asyncio.get_running_loop()

    async def waiting() -> bool:
        return job.id in app.state.queue._watcher.waiters

    async with httpx.AsyncClient(timeout=70) as client:
        async with serve_in_process(app, settings) as base:
            answer = asyncio.create_task(client.get(f"{base}/jobs/{job.id}", params={"wait": 60}))
            await wait_for(waiting, timeout=10)
            stopping = loop.time()
        stopped = loop.time() - stopping  # leaving the block shut the server down
        response = await asyncio.wait_for(answer, 5)
    assert (response.status_code, response.json()["status"]) == (200, "running")
    assert stopped < 5  # not the 60 s the wait asked for
