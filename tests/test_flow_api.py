"""Flow control over HTTP: GET /queues, pausing and resuming, the concurrency key at enqueue,
and problem documents for bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from jobq.api import create_app
from jobq.queue import Limits, Queue
from jobq.queue.validation import NOT_PRINTABLE
from jobq.registry import Registry
from jobq.settings import Settings
from tests.test_api import assert_problem, make_client

registry = Registry()


@registry.handler("tenant.task", concurrency_key="tenant", max_per_key=2)
async def tenant_task(ctx: object, payload: dict) -> None: ...


@registry.handler("account.task", concurrency_key=("account", "id"), max_per_key=1)
async def account_task(ctx: object, payload: dict) -> None: ...


@pytest.fixture
async def client(queue: Queue, pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(create_app(Settings(), pool=pool, registry=registry)) as c:
        yield c


async def test_pause_and_resume_a_queue_over_http(client: httpx.AsyncClient, queue: Queue) -> None:
    r = await client.post("/jobs", json={"kind": "tenant.task", "payload": {"tenant": "x"}})
    assert r.status_code == 201, r.text
    paused = await client.post("/queues/default/pause")
    assert paused.status_code == 200 and paused.json()["paused"] is True
    listed = (await client.get("/queues")).json()["queues"]
    (default,) = [q for q in listed if q["name"] == "default"]
    assert default["paused"] and default["counts"]["queued"] == 1 and default["total"] == 1
    assert await queue.claim("w", ["tenant.task"], ["default"], 10, lease_seconds=30) == []
    resumed = await client.post("/queues/default/resume")
    assert resumed.json()["paused"] is False
    assert len(await queue.claim("w", ["tenant.task"], ["default"], 10, lease_seconds=30)) == 1


async def test_a_queue_with_no_jobs_can_be_paused(client: httpx.AsyncClient) -> None:
    assert (await client.post("/queues/not-yet/pause")).json()["paused"] is True
    names = {q["name"]: q for q in (await client.get("/queues")).json()["queues"]}
    assert names["not-yet"]["paused"] and names["not-yet"]["total"] == 0
    stats = (await client.get("/stats")).json()
    assert [q["paused"] for q in stats["queues"] if q["queue"] == "not-yet"] == [True]


async def test_a_kind_is_paused_over_http(client: httpx.AsyncClient) -> None:
    assert (await client.post("/kinds/tenant.task/pause")).json()["paused"] is True
    assert [k["name"] for k in (await client.get("/queues")).json()["kinds"]] == ["tenant.task"]
    assert (await client.get("/stats")).json()["paused_kinds"] == ["tenant.task"]


@pytest.mark.parametrize("name", ["x" * 256, "a%01b", "tab%09", "nl%0A", "%0A%C2%B8"])
async def test_bad_queue_names_are_422_problems(client: httpx.AsyncClient, name: str) -> None:
    for action in ("pause", "resume"):
        assert_problem(await client.post(f"/queues/{name}/{action}"), 422, "validation_error")
    assert_problem(await client.post(f"/kinds/{name}/pause"), 422, "validation_error")


async def test_the_handler_s_key_function_sets_the_concurrency_key_at_enqueue(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/jobs", json={"kind": "tenant.task", "payload": {"tenant": 7}})
    assert r.json()["concurrency_key"] == "7"


async def test_a_concurrency_key_given_as_the_handler_derives_it_is_accepted(
    client: httpx.AsyncClient,
) -> None:
    body = {"kind": "tenant.task", "payload": {"tenant": 7}, "concurrency_key": "7"}
    r = await client.post("/jobs", json=body)
    assert r.status_code == 201 and r.json()["concurrency_key"] == "7"


async def test_a_concurrency_key_that_conflicts_with_the_derived_one_is_a_422_problem(
    client: httpx.AsyncClient,
) -> None:
    body = {"kind": "tenant.task", "payload": {"tenant": 7}, "concurrency_key": "z"}
    problem = assert_problem(await client.post("/jobs", json=body), 422, "validation_error")
    (error,) = problem["errors"]
    assert error["loc"] == ["body", "concurrency_key"] and error["type"] == "key_conflict"
    assert "conflicts with the key derived from payload" in error["msg"]


async def test_a_conflicting_concurrency_key_in_a_batch_names_its_item(
    client: httpx.AsyncClient,
) -> None:
    jobs = [{"kind": "tenant.task", "payload": {"tenant": 1}},
            {"kind": "tenant.task", "payload": {"tenant": 2}, "concurrency_key": "1"}]  # fmt: skip
    r = await client.post("/jobs/batch", json={"jobs": jobs})
    problem = assert_problem(r, 422, "validation_error")
    assert [e["loc"] for e in problem["errors"]] == [["body", "jobs", 1, "concurrency_key"]]


async def test_a_job_enqueued_over_http_without_a_registry_gets_the_declared_key(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    await queue.declare_limits("w", registry.kind_limits, {})
    async with make_client(create_app(Settings(), pool=pool)) as bare:
        r = await bare.post("/jobs", json={"kind": "tenant.task", "payload": {"tenant": "t"}})
    assert r.status_code == 201 and r.json()["concurrency_key"] == "t"


@pytest.mark.parametrize("key", ["", "k" * 256, 5, "a\nb"])
async def test_a_bad_concurrency_key_is_a_422_problem(
    client: httpx.AsyncClient, key: object
) -> None:
    r = await client.post("/jobs", json={"kind": "tenant.task", "concurrency_key": key})
    assert_problem(r, 422, "validation_error")


async def test_flow_routes_are_in_the_openapi_document(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in ("/queues", "/queues/{name}/pause", "/queues/{name}/resume",
                 "/kinds/{name}/pause", "/kinds/{name}/resume"):  # fmt: skip
        assert path in paths
    assert "422" in paths["/queues/{name}/pause"]["post"]["responses"]


@pytest.mark.parametrize("path", ["a%2Fb", "a/b"])
async def test_a_queue_name_with_a_slash_is_paused_and_resumed(
    client: httpx.AsyncClient, queue: Queue, path: str
) -> None:
    paused = await client.post(f"/queues/{path}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["name"] == "a/b" and paused.json()["paused"] is True
    assert [s.name for s in await queue.flow_states()] == ["a/b"]
    resumed = await client.post(f"/queues/{path}/resume")
    assert resumed.json()["paused"] is False and await queue.flow_states() == []


async def test_a_kind_name_with_a_slash_is_paused(client: httpx.AsyncClient) -> None:
    r = await client.post("/kinds/reports%2Fmonthly/pause")
    assert r.status_code == 200 and r.json()["name"] == "reports/monthly"


@pytest.mark.parametrize("url", ["/queues/a%FFb/pause", "/queues/a%C3/resume", "/kinds/%FF/pause"])
async def test_a_name_that_is_not_utf8_is_a_422_invalid_utf8_problem(
    client: httpx.AsyncClient, queue: Queue, url: str
) -> None:
    problem = assert_problem(await client.post(url), 422, "invalid_utf8")
    assert [e["loc"] for e in problem["errors"]] == [["path", "name"]]
    assert await queue.flow_states() == []


@pytest.mark.parametrize("name", ["a%C2%85b", "a%C2%9Fb", "x%E2%80%A8"])
async def test_a_name_with_a_c1_or_other_control_character_is_reported_at_the_path(
    client: httpx.AsyncClient, name: str
) -> None:
    problem = assert_problem(await client.post(f"/queues/{name}/pause"), 422, "validation_error")
    assert [e["loc"] for e in problem["errors"]] == [["path", "name"]]


async def test_a_name_with_a_format_character_is_refused_at_the_path_as_not_printable(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/queues/%E2%80%8B/pause")  # U+200B ZERO WIDTH SPACE, category Cf
    problem = assert_problem(r, 422, "validation_error")
    assert problem["errors"] == [
        {"loc": ["path", "name"], "msg": NOT_PRINTABLE, "type": "value_error"}
    ]


async def test_a_new_pause_beyond_jobq_max_paused_is_a_409_problem(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    async with make_client(create_app(Settings(max_paused=2), pool=pool)) as c:
        assert (await c.post("/queues/a/pause")).status_code == 200
        assert (await c.post("/kinds/b/pause")).status_code == 200
        problem = assert_problem(await c.post("/queues/c/pause"), 409, "too_many_paused")
        assert problem["max_paused"] == 2
        assert (await c.post("/queues/a/pause")).status_code == 200  # paused already
        assert (await c.post("/queues/a/resume")).status_code == 200
        assert (await c.post("/queues/c/pause")).status_code == 200
    assert sorted(s.name for s in await queue.flow_states()) == ["b", "c"]


async def test_a_concurrency_key_given_stands_when_the_handler_derives_none_from_the_payload(
    client: httpx.AsyncClient,
) -> None:
    body = {"kind": "tenant.task", "payload": {"tenant": {"id": 1}}, "concurrency_key": "t"}
    r = await client.post("/jobs", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["concurrency_key"] == "t"


@pytest.mark.parametrize("tenant", [1.5, "k" * 256, "a\u0085b"])
async def test_an_unusable_derived_key_is_reported_at_the_payload_field_it_came_from(
    client: httpx.AsyncClient, tenant: object
) -> None:
    r = await client.post("/jobs", json={"kind": "tenant.task", "payload": {"tenant": tenant}})
    problem = assert_problem(r, 422, "validation_error")
    assert [e["loc"] for e in problem["errors"]] == [["body", "payload", "tenant"]]


async def test_an_unusable_key_from_a_nested_field_is_reported_at_that_field(
    client: httpx.AsyncClient,
) -> None:
    body = {"kind": "account.task", "payload": {"account": {"id": 2.5}}}
    problem = assert_problem(await client.post("/jobs", json=body), 422, "validation_error")
    assert [e["loc"] for e in problem["errors"]] == [["body", "payload", "account", "id"]]


async def test_an_unusable_derived_key_in_a_batch_is_reported_at_its_item_s_payload_field(
    client: httpx.AsyncClient,
) -> None:
    jobs = [{"kind": "tenant.task", "payload": {"tenant": "ok"}},
            {"kind": "tenant.task", "payload": {"tenant": 1.5}}]  # fmt: skip
    r = await client.post("/jobs/batch", json={"jobs": jobs})
    problem = assert_problem(r, 422, "validation_error")
    assert [e["loc"] for e in problem["errors"]] == [["body", "jobs", 1, "payload", "tenant"]]


async def test_a_pause_body_naming_who_pauses_is_answered_and_listed_as_paused_by(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/queues/reports/pause", json={"by": "ops: Ana"})
    assert r.status_code == 200 and r.json()["paused_by"] == "ops: Ana"
    (listed,) = [q for q in (await client.get("/queues")).json()["queues"] if q["paused"]]
    assert listed["paused_by"] == "ops: Ana"


@pytest.mark.parametrize("by", ["", "a\nb", "zero\u200bwidth", "x" * 201, 5, None])
async def test_a_pause_by_that_is_not_1_to_200_printable_characters_is_a_422_at_body_by(
    client: httpx.AsyncClient, queue: Queue, by: object
) -> None:
    r = await client.post("/kinds/k/pause", json={"by": by})
    problem = assert_problem(r, 422, "validation_error")
    assert [e["loc"] for e in problem["errors"]] == [["body", "by"]]
    assert await queue.flow_states() == []


@pytest.mark.parametrize("body", [{"who": "me"}, {"by": "me", "until": "noon"}])
async def test_a_pause_body_with_another_field_is_a_422_problem_naming_it(
    client: httpx.AsyncClient, queue: Queue, body: dict[str, str]
) -> None:
    problem = assert_problem(
        await client.post("/queues/q/pause", json=body), 422, "validation_error"
    )
    assert ["body", "who" if "who" in body else "until"] in [e["loc"] for e in problem["errors"]]
    assert await queue.flow_states() == []


@pytest.mark.parametrize("content", [b"by=me", b"[1]", b'"me"'])
async def test_a_pause_body_that_is_not_a_json_object_is_a_422_problem(
    client: httpx.AsyncClient, queue: Queue, content: bytes
) -> None:
    r = await client.post(
        "/queues/q/pause", content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert await queue.flow_states() == []


async def test_a_pause_body_of_another_media_type_is_a_415_problem(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    r = await client.post(
        "/queues/q/pause", content=b"by=me", headers={"content-type": "text/plain"}
    )
    assert_problem(r, 415, "unsupported_media_type")
    assert await queue.flow_states() == []


@pytest.mark.parametrize("content", [b'{"by": "ops"}', b"[]", b"null"])
async def test_a_resume_body_that_is_not_an_empty_object_is_a_422_problem_and_resumes_nothing(
    client: httpx.AsyncClient, queue: Queue, content: bytes
) -> None:
    await queue.pause("queue", "q")
    r = await client.post(
        "/queues/q/resume", content=content, headers={"content-type": "application/json"}
    )
    assert_problem(r, 422, "validation_error")
    assert [s.paused for s in await queue.flow_states()] == [True]


async def test_a_resume_whose_content_length_says_zero_resumes(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    await queue.pause("queue", "q")
    r = await client.post("/queues/q/resume", headers={"content-length": "00"})
    assert r.status_code == 200 and r.json()["paused"] is False, r.text


async def test_a_resume_with_an_empty_object_body_resumes(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    await queue.pause("kind", "k")
    r = await client.post("/kinds/k/resume", json={})
    assert r.status_code == 200 and r.json()["paused"] is False, r.text
    assert await queue.flow_states() == []


async def test_stats_lists_a_declared_limit_and_what_runs_under_it(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    await queue.declare_limits("w", {"tenant.task": Limits(max_concurrency=3)}, {})
    r = await client.get("/stats")
    assert r.status_code == 200, r.text
    assert [(x["name"], x["running"]) for x in r.json()["limits"]] == [("tenant.task", 0)]


async def test_stats_and_get_queues_list_the_same_queues(
    client: httpx.AsyncClient, queue: Queue
) -> None:
    # One with jobs, one paused, one limited (fair) without jobs.
    await queue.declare_limits("w", {}, {"tenants": Limits(fair=True)})
    assert (await client.post("/jobs", json={"kind": "tenant.task", "queue": "busy"})).is_success
    assert (await client.post("/queues/held/pause")).is_success
    listed = [q["name"] for q in (await client.get("/queues")).json()["queues"]]
    stats = await client.get("/stats")
    assert stats.status_code == 200, stats.text
    in_stats = [q["queue"] for q in stats.json()["queues"]]
    assert sorted(listed) == sorted(in_stats) == ["busy", "held", "tenants"]
