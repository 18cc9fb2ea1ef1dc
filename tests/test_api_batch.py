"""POST /jobs/batch: many jobs, one request, all or nothing, per-job idempotency keys."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from jobq import Middleware
from jobq.api import create_app
from jobq.examples import registry as examples
from jobq.middleware import EnqueueNext
from jobq.queue import InvalidJob, NewJob, Queue, lease_of
from jobq.registry import Registry
from jobq.settings import Settings
from tests.helpers import ALL_JOBS
from tests.test_api import PROBLEM, assert_problem, make_client


@pytest.fixture
async def client(queue: Queue, pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(max_payload_bytes=4096, batch_max=50, batch_max_bytes=64 * 1024)
    async with make_client(create_app(settings, pool=pool, registry=examples)) as c:
        yield c


async def stored(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {ALL_JOBS}"))


async def test_a_batch_is_stored_and_answered_in_request_order(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    jobs = [{"kind": "echo", "payload": {"i": i}} for i in range(20)]
    r = await client.post("/jobs/batch", json={"jobs": jobs})
    assert r.status_code == 201
    out = r.json()["jobs"]
    assert [j["payload"]["i"] for j in out] == list(range(20))
    assert all(j["created"] and j["status"] == "queued" for j in out)
    assert await stored(pool) == 20


async def test_one_invalid_job_stores_nothing_and_every_bad_job_is_listed(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    jobs = [
        {"kind": "echo"},
        {"kind": "echo", "priority": 10**6},
        {"kind": "nope"},
        {"kind": "sleep", "payload": {"seconds": "x"}},
        {"kind": "echo"},
        "not an object",
    ]
    r = await client.post("/jobs/batch", json={"jobs": jobs})
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    locs = [e["loc"][:4] for e in r.json()["errors"]]
    assert ["body", "jobs", 1, "priority"] in locs
    assert ["body", "jobs", 2, "kind"] in locs
    assert ["body", "jobs", 3, "payload"] in locs
    assert ["body", "jobs", 5] in [loc[:3] for loc in locs]
    assert {loc[2] for loc in locs} == {1, 2, 3, 5}
    assert "4 of 6 jobs are invalid" in r.json()["detail"]
    assert await stored(pool) == 0


async def test_jobs_well_formed_but_refused_by_the_registry_are_listed_as_post_jobs_words_them(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    bad = [{"kind": "nope"}, {"kind": "sleep", "payload": {"seconds": "x"}}]
    r = await client.post("/jobs/batch", json={"jobs": [{"kind": "echo"}, *bad]})
    assert r.status_code == 422
    alone = [(await client.post("/jobs", json=job)).json()["errors"] for job in bad]
    assert r.json()["errors"] == [
        {**e, "loc": ["body", "jobs", i, *e["loc"][1:]]}
        for i, errors in enumerate(alone, start=1)
        for e in errors
    ]
    assert await stored(pool) == 0


async def test_per_job_keys_say_which_jobs_were_created_and_which_existed(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    before = await queue.enqueue(NewJob("echo", {"a": 1}, idempotency_key="k1", max_attempts=5))
    jobs = [
        {"kind": "echo", "payload": {"a": 1}, "idempotency_key": "k1", "max_attempts": 5},
        {"kind": "echo", "payload": {"b": 2}, "idempotency_key": "k2"},
        {"kind": "echo", "payload": {"b": 2}, "idempotency_key": "k2"},
        {"kind": "echo"},
    ]
    r = await client.post("/jobs/batch", json={"jobs": jobs})
    assert r.status_code == 201
    out = r.json()["jobs"]
    assert [j["created"] for j in out] == [False, True, False, True]
    assert out[0]["id"] == str(before.job.id)
    assert out[1]["id"] == out[2]["id"]
    again = await client.post("/jobs/batch", json={"jobs": jobs[:3]})
    assert again.status_code == 200  # nothing new: a replay of the whole batch
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in out[:3]]


async def test_each_job_answered_is_the_job_get_answers(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    # A replay of a job that has ended (result, in history) and new jobs: every field as
    # GET /jobs/{id} has it, the JSON ones included.
    ended = await queue.enqueue(NewJob("echo", {"n": [1, {"x": None}]}, idempotency_key="e1"))
    [claimed] = await queue.claim("w", ["echo"], ["default"], 1, lease_seconds=60)
    assert await queue.complete(lease_of(claimed), {"r": [1.5, "é", None]})
    jobs = [
        {"kind": "echo", "payload": {"n": [1, {"x": None}]}, "idempotency_key": "e1"},
        {"kind": "echo", "payload": {"s": "ü\u2028", "f": 0.1, "big": 2**63}, "priority": 3},
        {"kind": "echo", "run_at": "2030-01-02T03:04:05.5Z", "concurrency_key": "t1"},
    ]
    r = await client.post("/jobs/batch", json={"jobs": jobs})
    assert r.status_code == 201
    out = r.json()["jobs"]
    assert out[0]["id"] == str(ended.job.id) and out[0]["result"] == {"r": [1.5, "é", None]}
    for job in out:
        assert job.pop("created") is (job["id"] != str(ended.job.id))
        assert job == (await client.get(f"/jobs/{job['id']}")).json()


async def test_a_key_reused_for_another_job_refuses_the_whole_batch(
    client: httpx.AsyncClient, queue: Queue, pool: asyncpg.Pool
) -> None:
    before = await queue.enqueue(NewJob("echo", {"a": 1}, idempotency_key="k1"))
    jobs = [{"kind": "echo"}, {"kind": "echo", "payload": {"a": 2}, "idempotency_key": "k1"}]
    r = await client.post("/jobs/batch", json={"jobs": jobs})
    assert r.status_code == 422
    body = r.json()
    assert body["error"] == "idempotency_key_reused" and body["job_id"] == str(before.job.id)
    assert body["errors"][0]["loc"] == ["body", "jobs", 1, "idempotency_key"]
    assert await stored(pool) == 1


async def test_more_jobs_than_the_limit_is_413(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    r = await client.post("/jobs/batch", json={"jobs": [{"kind": "echo"}] * 51})
    assert r.status_code == 413 and r.json()["error"] == "batch_too_large"
    assert r.json()["batch_max"] == 50
    big = await client.post("/jobs/batch", content=b'{"jobs": [' + b" " * 70000 + b"]}",
                            headers={"content-type": "application/json"})  # fmt: skip
    assert big.status_code == 413 and big.json()["error"] == "payload_too_large"
    assert await stored(pool) == 0


async def test_a_job_payload_over_the_single_job_bound_is_refused(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    jobs = [{"kind": "echo"}, {"kind": "echo", "payload": {"x": "y" * 5000}}]
    r = await client.post("/jobs/batch", json={"jobs": jobs})
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["body", "jobs", 1, "payload"]
    assert await stored(pool) == 0


async def test_a_body_that_is_not_a_jobs_object_is_422(client: httpx.AsyncClient) -> None:
    for body in ([{"kind": "echo"}], {"jobs": [], "extra": 1}, {"jobs": {"kind": "echo"}}):
        r = await client.post("/jobs/batch", json=body)
        assert r.status_code == 422, body


async def test_an_idempotency_key_header_on_a_batch_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/jobs/batch", json={"jobs": [{"kind": "echo"}]}, headers={"Idempotency-Key": "x"}
    )
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["header", "Idempotency-Key"]


async def test_an_empty_batch_stores_nothing_and_is_200(client: httpx.AsyncClient) -> None:
    r = await client.post("/jobs/batch", json={"jobs": []})
    assert r.status_code == 200 and r.json() == {"jobs": []}


async def test_the_batch_route_is_in_the_openapi_document_with_an_example(
    client: httpx.AsyncClient,
) -> None:
    op = (await client.get("/openapi.json")).json()["paths"]["/jobs/batch"]["post"]
    body = op["requestBody"]["content"]["application/json"]
    assert body["schema"]["properties"]["jobs"]["maxItems"] == 50
    assert body["examples"]
    assert {"200", "201", "413", "422"} <= set(op["responses"])


class _Gate(Middleware):
    """Refuses the jobs whose payload says so, naming them; or hands on a job with no kind."""

    def __init__(self, *, replace: bool = False, name_index: bool = True) -> None:
        self.replace = replace
        self.name_index = name_index

    async def enqueue(self, jobs: list[NewJob], call_next: EnqueueNext) -> list[uuid.UUID]:
        for i, job in enumerate(jobs):
            if job.payload.get("refuse"):
                if self.replace:
                    jobs = [*jobs[:i], dataclasses.replace(job, kind=""), *jobs[i + 1 :]]
                    break
                raise InvalidJob("payload", "refused", index=i if self.name_index else None)
        return await call_next(jobs)


def _gated(pool: asyncpg.Pool, gate: _Gate) -> httpx.AsyncClient:
    registry = Registry(middleware=[gate])

    @registry.handler("echo")
    async def echo(ctx: object, payload: dict) -> None: ...

    return make_client(create_app(Settings(), pool=pool, registry=registry))


_REFUSED = {"jobs": [{"kind": "echo", "payload": {}}, {"kind": "echo", "payload": {"refuse": 1}}]}


async def test_a_job_an_enqueue_middleware_refuses_in_a_batch_is_named_by_index(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    async with _gated(pool, _Gate()) as c:
        problem = assert_problem(
            await c.post("/jobs/batch", json=_REFUSED), 422, "validation_error"
        )
    assert [e["loc"] for e in problem["errors"]] == [["body", "jobs", 1, "payload"]]
    assert await stored(pool) == 0


async def test_an_invalid_job_an_enqueue_middleware_hands_on_in_a_batch_is_named_by_index(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    async with _gated(pool, _Gate(replace=True)) as c:
        problem = assert_problem(
            await c.post("/jobs/batch", json=_REFUSED), 422, "validation_error"
        )
    assert [e["loc"] for e in problem["errors"]] == [["body", "jobs", 1, "kind"]]


async def test_a_batch_refused_by_a_middleware_naming_no_job_is_located_at_the_jobs(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    async with _gated(pool, _Gate(name_index=False)) as c:
        problem = assert_problem(
            await c.post("/jobs/batch", json=_REFUSED), 422, "validation_error"
        )
    assert [e["loc"] for e in problem["errors"]] == [["body", "jobs"]]
