"""The HTTP API: every route and every status code, as a client sees them."""

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
from jobq.examples import registry as examples
from jobq.queue import NewJob, Queue, lease_of
from jobq.settings import Settings
from tests.helpers import ALL_JOBS

PROBLEM = "application/problem+json"


def make_client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def client(queue: Queue, pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(max_payload_bytes=4096), pool=pool, registry=examples)
    async with make_client(app) as c:
        yield c


@pytest.fixture
async def open_client(queue: Queue, pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    """An API started without a registry: any kind, any payload object."""
    async with make_client(create_app(Settings(), pool=pool)) as c:
        yield c


def assert_problem(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["error"] == error
    assert body["title"] and body["detail"] and body["type"]
    assert "Traceback" not in response.text
    return body


async def count_jobs(queue: Queue) -> int:
    return int(await queue.pool.fetchval(f"SELECT count(*) FROM {ALL_JOBS}"))


# -- POST /jobs ------------------------------------------------------------------------


async def test_post_job_creates_it_with_201(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs", json={"kind": "echo", "payload": {"a": 1}})
    assert response.status_code == 201
    job = response.json()
    assert job["kind"] == "echo" and job["payload"] == {"a": 1}
    assert job["status"] == "queued"
    expected = {
        "id", "kind", "queue", "status", "payload", "result", "priority", "attempts",
        "max_attempts", "last_error", "errors", "idempotency_key", "cancel_requested",
        "run_at", "created_at", "updated_at", "started_at", "finished_at",
    }  # fmt: skip
    assert expected <= set(job)


async def test_post_job_accepts_every_option(client: httpx.AsyncClient) -> None:
    body = {
        "kind": "echo",
        "payload": {},
        "queue": "mail",
        "priority": -3,
        "max_attempts": 7,
        "run_at": "2030-01-01T00:00:00Z",
    }
    job = (await client.post("/jobs", json=body)).json()
    assert (job["queue"], job["priority"], job["max_attempts"]) == ("mail", -3, 7)
    assert job["run_at"].startswith("2030-01-01T00:00:00")


async def test_post_same_idempotency_key_returns_existing_job_with_200(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await client.post("/jobs", json={"kind": "echo"}, headers=headers)
    again = await client.post("/jobs", json={"kind": "echo"}, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["idempotency_key"] == "order-42"


async def test_idempotency_header_wins_over_the_body_field(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs",
        json={"kind": "echo", "idempotency_key": "from-body"},
        headers={"Idempotency-Key": "from-header"},
    )
    assert response.json()["idempotency_key"] == "from-header"


async def test_idempotency_key_in_the_body_works_without_the_header(
    client: httpx.AsyncClient,
) -> None:
    first = await client.post("/jobs", json={"kind": "echo", "idempotency_key": "b"})
    again = await client.post("/jobs", json={"kind": "echo", "idempotency_key": "b"})
    assert (first.status_code, again.status_code) == (201, 200)


async def test_idempotency_key_reused_with_another_payload_is_422(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    headers = {"Idempotency-Key": "k"}
    await client.post("/jobs", json={"kind": "echo", "payload": {"a": 1}}, headers=headers)
    response = await client.post(
        "/jobs", json={"kind": "echo", "payload": {"a": 2}}, headers=headers
    )
    assert_problem(response, 422, "idempotency_key_reused")
    assert await count_jobs(queue) == 1


async def test_fifty_concurrent_posts_with_one_key_create_one_job(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    responses = await asyncio.gather(
        *(
            client.post("/jobs", json={"kind": "echo"}, headers={"Idempotency-Key": "race"})
            for _ in range(50)
        )
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 49 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert await count_jobs(queue) == 1


async def test_unknown_kind_is_422_when_the_registry_is_loaded(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    assert_problem(await client.post("/jobs", json={"kind": "nope"}), 422, "unknown_kind")
    assert await count_jobs(queue) == 0


async def test_payload_that_does_not_fit_the_kind_is_422_with_fields(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    response = await client.post("/jobs", json={"kind": "sleep", "payload": {"seconds": "x"}})
    body = assert_problem(response, 422, "invalid_payload")
    assert body["errors"][0]["loc"] == ["body", "payload", "seconds"]
    assert await count_jobs(queue) == 0


async def test_without_a_registry_any_kind_is_accepted(open_client: httpx.AsyncClient) -> None:
    response = await open_client.post("/jobs", json={"kind": "anything.at.all"})
    assert response.status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"kind": ""},
        {"kind": 5},
        {"kind": "echo", "payload": []},
        {"kind": "echo", "payload": None},
        {"kind": "echo", "max_attempts": 0},
        {"kind": "echo", "max_attempts": 1001},
        {"kind": "echo", "priority": 10**6},
        {"kind": "echo", "run_at": "tomorrow"},
        {"kind": "echo", "unexpected": 1},
        ["kind", "echo"],
    ],
)
async def test_invalid_job_bodies_are_422_and_store_nothing(
    client: httpx.AsyncClient, queue: Queue, body: Any
) -> None:
    assert_problem(await client.post("/jobs", json=body), 422, "validation_error")
    assert await count_jobs(queue) == 0


async def test_invalid_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(response, 422, "invalid_json")


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient, queue: Queue) -> None:
    response = await client.post("/jobs", json={"kind": "echo", "payload": {"x": "y" * 5000}})
    assert_problem(response, 413, "payload_too_large")
    assert await count_jobs(queue) == 0


async def test_non_json_content_type_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs", content=b"kind=echo")
    assert_problem(response, 415, "unsupported_media_type")


async def test_nul_character_in_payload_is_422(client: httpx.AsyncClient, queue: Queue) -> None:
    response = await client.post(
        "/jobs",
        content=b'{"kind": "echo", "payload": {"s": "a\\u0000b"}}',
        headers={"content-type": "application/json"},
    )
    assert_problem(response, 422, "validation_error")
    assert await count_jobs(queue) == 0


async def test_invalid_idempotency_key_header_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/jobs", json={"kind": "echo"}, headers={"Idempotency-Key": "k" * 256}
    )
    assert_problem(response, 422, "validation_error")


# -- GET /jobs/{id} --------------------------------------------------------------------


async def test_get_job_returns_it(client: httpx.AsyncClient) -> None:
    created = (await client.post("/jobs", json={"kind": "echo"})).json()
    response = await client.get(f"/jobs/{created['id']}")
    assert response.status_code == 200
    assert response.json() == created


async def test_get_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get(f"/jobs/{uuid.uuid4()}"), 404, "not_found")


@pytest.mark.parametrize("action", ["", "?wait=0", "/cancel", "/retry"])
async def test_an_id_of_a_time_past_the_year_9999_is_404(
    client: httpx.AsyncClient, action: str
) -> None:
    # A version-7 id whose time does not fit a datetime: a 500 before.
    far = "ffffffff-ffff-7fff-bfff-ffffffffffff"
    method = "POST" if action.startswith("/") else "GET"
    assert_problem(await client.request(method, f"/jobs/{far}{action}"), 404, "not_found")


async def test_get_malformed_id_is_422(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/jobs/not-a-uuid"), 422, "validation_error")


# -- GET /jobs -------------------------------------------------------------------------


async def test_list_jobs_newest_first_with_paging(client: httpx.AsyncClient) -> None:
    ids = [(await client.post("/jobs", json={"kind": "echo"})).json()["id"] for _ in range(3)]
    body = (await client.get("/jobs", params={"limit": 2})).json()
    assert [j["id"] for j in body["jobs"]] == ids[::-1][:2]
    assert (body["limit"], body["offset"]) == (2, 0)
    rest = (await client.get("/jobs", params={"cursor": body["next_cursor"]})).json()
    assert [j["id"] for j in rest["jobs"]] == [ids[0]]
    third = (await client.get("/jobs", params={"limit": 2, "offset": 2})).json()
    assert [j["id"] for j in third["jobs"]] == [ids[0]]


async def test_list_jobs_filters(client: httpx.AsyncClient) -> None:
    await client.post("/jobs", json={"kind": "echo", "queue": "a"})
    await client.post("/jobs", json={"kind": "fail", "queue": "b"})
    by_kind = (await client.get("/jobs", params={"kind": "fail"})).json()["jobs"]
    by_queue = (await client.get("/jobs", params={"queue": "a"})).json()["jobs"]
    by_status = (await client.get("/jobs", params={"status": "succeeded"})).json()["jobs"]
    assert [j["kind"] for j in by_kind] == ["fail"]
    assert [j["queue"] for j in by_queue] == ["a"]
    assert by_status == []


@pytest.mark.parametrize(("limit", "expected"), [("0", 1), ("-3", 1), ("1000", 200)])
async def test_list_limit_is_clamped(
    client: httpx.AsyncClient, queue: Queue, limit: str, expected: int
) -> None:
    await queue.enqueue_many([NewJob(kind="echo") for _ in range(205)])
    body = (await client.get("/jobs", params={"limit": limit})).json()
    assert body["limit"] == expected
    assert len(body["jobs"]) == expected


@pytest.mark.parametrize(
    "params",
    [
        {"status": "finished"},
        {"limit": "ten"},
        {"limit": "1.5"},
        {"offset": "-1"},
        {"offset": "x"},
        {"offset": str(2**70)},
        {"limit": "1_0"},
        {"offset": " 1"},
        {"limit": "+5"},
        {"cursor": "garbage!"},
    ],
)
async def test_invalid_list_parameters_are_422(
    client: httpx.AsyncClient, params: dict[str, str]
) -> None:
    assert_problem(await client.get("/jobs", params=params), 422, "validation_error")


async def test_huge_limit_is_clamped_not_an_error(client: httpx.AsyncClient) -> None:
    response = await client.get("/jobs", params={"limit": str(2**70)})
    assert response.status_code == 200
    assert response.json()["limit"] == 200


# -- POST /jobs/{id}/cancel ------------------------------------------------------------


async def test_cancel_queued_job_is_200_cancelled(client: httpx.AsyncClient) -> None:
    job = (await client.post("/jobs", json={"kind": "echo"})).json()
    response = await client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 200
    assert response.json() == {"status": "cancelled", "job_id": job["id"]}
    assert (await client.get(f"/jobs/{job['id']}")).json()["status"] == "cancelled"


async def test_cancel_running_job_is_202_pending(client: httpx.AsyncClient, queue: Queue) -> None:
    job = (await client.post("/jobs", json={"kind": "echo"})).json()
    await queue.claim("w", ["echo"], ["default"], 1, lease_seconds=30)
    response = await client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 202
    assert response.json() == {"status": "pending", "job_id": job["id"]}


async def test_cancel_finished_job_is_409_naming_its_state(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    job = (await client.post("/jobs", json={"kind": "echo"})).json()
    [claimed] = await queue.claim("w", ["echo"], ["default"], 1, lease_seconds=30)
    await queue.complete(lease_of(claimed), None)
    body = assert_problem(await client.post(f"/jobs/{job['id']}/cancel"), 409, "job_terminal")
    assert "succeeded" in body["detail"]


async def test_cancel_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.post(f"/jobs/{uuid.uuid4()}/cancel"), 404, "not_found")


async def test_cancel_malformed_id_is_422(client: httpx.AsyncClient) -> None:
    assert_problem(await client.post("/jobs/123/cancel"), 422, "validation_error")


# -- health, ids, errors ---------------------------------------------------------------


async def test_healthz_and_readyz_are_200(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ok"}


async def test_every_response_carries_a_request_id(client: httpx.AsyncClient) -> None:
    generated = await client.get("/healthz")
    echoed = await client.get("/jobs/not-a-uuid", headers={"x-request-id": "abc-123"})
    assert len(generated.headers["x-request-id"]) >= 16
    assert echoed.headers["x-request-id"] == "abc-123"
    assert echoed.json()["request_id"] == "abc-123"


async def test_unknown_route_and_method_are_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/nowhere"), 404, "not_found")
    assert_problem(await client.delete("/jobs"), 405, "method_not_allowed")


async def test_database_down_is_503_with_retry_after(queue: Queue) -> None:
    settings = Settings()
    app = create_app(
        settings, dsn="postgresql://postgres@127.0.0.1:1/none?connect_timeout=1", registry=examples
    )
    async with app.router.lifespan_context(app), make_client(app) as c:
        response = await c.post("/jobs", json={"kind": "echo"})
        body = assert_problem(response, 503, "database_unavailable")
        assert response.headers["retry-after"]
        assert "Traceback" not in str(body)
        assert (await c.get("/readyz")).status_code == 503
        assert (await c.get("/healthz")).status_code == 200


async def test_a_job_posted_without_max_attempts_shows_null_until_a_worker_claims_it(
    open_client: httpx.AsyncClient, queue: Queue
) -> None:
    created = (await open_client.post("/jobs", json={"kind": "anything"})).json()
    assert created["max_attempts"] is None
    await queue.claim(
        "w", ["anything"], ["default"], 1, lease_seconds=30, max_attempts={"anything": 4}
    )
    shown = (await open_client.get(f"/jobs/{created['id']}")).json()
    assert shown["max_attempts"] == 4
