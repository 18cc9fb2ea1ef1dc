"""POST /jobs/{id}/retry: an operator runs a failed or cancelled job again."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from jobq.api import create_app
from jobq.queue import Job, NewJob, Queue
from jobq.settings import Settings


@pytest.fixture
async def client(queue: Queue) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(), pool=queue.pool)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


async def failed_job(queue: Queue) -> Job:
    created = await queue.enqueue(NewJob(kind="echo", max_attempts=2))
    for _ in range(2):
        (job,) = await queue.claim("w", ["echo"], ["default"], 1, lease_seconds=30)
        await queue.fail(job, f"RuntimeError: attempt {job.attempts}")
        await queue.pool.execute("UPDATE jobs SET run_at = now() WHERE id = $1", job.id)
    job = await queue.get(created.job.id)
    assert job.status == "failed_permanent"
    return job


async def test_retry_requeues_a_failed_job_with_attempts_reset_and_errors_kept(
    queue: Queue, client: httpx.AsyncClient
) -> None:
    job = await failed_job(queue)

    response = await client.post(f"/jobs/{job.id}/retry")

    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["status"], body["attempts"]) == (str(job.id), "queued", 0)
    assert [e["error"] for e in body["errors"]] == [
        "RuntimeError: attempt 1",
        "RuntimeError: attempt 2",
    ]
    claimed = await queue.claim("w", ["echo"], ["default"], 1, lease_seconds=30)
    assert [j.id for j in claimed] == [job.id]


async def test_retry_requeues_a_cancelled_job(queue: Queue, client: httpx.AsyncClient) -> None:
    job = (await queue.enqueue(NewJob(kind="echo"))).job
    await queue.request_cancel(job.id)

    response = await client.post(f"/jobs/{job.id}/retry")

    assert response.status_code == 200
    assert response.json()["status"] == "queued"
    assert response.json()["cancel_requested"] is False


@pytest.mark.parametrize("status", ["queued", "running", "succeeded"])
async def test_retry_of_a_job_that_did_not_fail_or_get_cancelled_is_409(
    queue: Queue, client: httpx.AsyncClient, status: str
) -> None:
    job = (await queue.enqueue(NewJob(kind="echo"))).job
    if status != "queued":
        (claimed,) = await queue.claim("w", ["echo"], ["default"], 1, lease_seconds=30)
        if status == "succeeded":
            from jobq.queue import lease_of

            await queue.complete(lease_of(claimed))

    response = await client.post(f"/jobs/{job.id}/retry")

    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["job_status"] == status
    assert (await queue.get(job.id)).status == status


async def test_retry_of_an_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(f"/jobs/{uuid.uuid4()}/retry")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_retry_with_a_malformed_id_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs/not-a-uuid/retry")

    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


async def test_retry_is_documented_in_openapi(client: httpx.AsyncClient) -> None:
    op = (await client.get("/openapi.json")).json()["paths"]["/jobs/{job_id}/retry"]["post"]
    assert {"200", "404", "409"} <= set(op["responses"])
