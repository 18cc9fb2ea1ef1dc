"""Unique jobs: a duplicate enqueue within the period returns the existing job."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from jobq.api import create_app
from jobq.maintenance import Cleaner
from jobq.queue import InvalidJob, NewJob, Queue, lease_of
from jobq.settings import Settings
from tests.helpers import ALL_JOBS

HOUR = timedelta(hours=1)


@pytest.fixture
async def queue(queue: Queue) -> Queue:
    await queue.pool.execute("TRUNCATE jobq_unique_keys")
    return queue


_OPTIONS = ("unique_by", "unique_states")


def unique(q: Queue, payload: dict[str, Any] | None = None, **kw: Any) -> Any:
    """Enqueue a unique "sync" job (unique for an hour); NewJob fields and unique options."""
    options = {k: kw.pop(k) for k in _OPTIONS if k in kw}
    new = NewJob(kind="sync", payload=payload or {"account": 7}, **kw)
    return q.enqueue(new, unique_for=HOUR, **options)


async def count(queue: Queue) -> int:
    return int(await queue.pool.fetchval(f"SELECT count(*) FROM {ALL_JOBS}"))


async def test_a_duplicate_within_the_period_returns_the_existing_job(queue: Queue) -> None:
    first = await unique(queue)
    again = await unique(queue)
    assert first.created and not again.created
    assert again.job.id == first.job.id
    assert await count(queue) == 1


async def test_an_enqueue_after_the_period_creates_a_new_job(queue: Queue) -> None:
    first = await unique(queue)
    # The period passes (the key's expiry is what the database compares with its now()).
    await queue.pool.execute("UPDATE jobq_unique_keys SET expires_at = now() - interval '1s'")
    later = await unique(queue)
    assert later.created and later.job.id != first.job.id
    assert await unique(queue) == type(later)(later.job, created=False)


async def test_200_concurrent_enqueues_create_exactly_one_job(queue: Queue) -> None:
    results = await asyncio.gather(*(unique(queue) for _ in range(200)))
    assert sum(r.created for r in results) == 1
    assert len({r.job.id for r in results}) == 1
    assert await count(queue) == 1


async def test_concurrent_enqueues_after_a_failure_take_the_key_over_once(queue: Queue) -> None:
    first = (await unique(queue, max_attempts=1)).job
    (claimed,) = await queue.claim("w", ["sync"], ["default"], 1, lease_seconds=10)
    assert await queue.fail(claimed, "boom") == "failed_permanent"
    results = await asyncio.gather(*(unique(queue) for _ in range(50)))
    assert sum(r.created for r in results) == 1
    (new_id,) = {r.job.id for r in results}
    assert new_id != first.id


async def _holder_in(queue: Queue, status: str) -> None:
    job = (await unique(queue, max_attempts=2)).job
    if status == "queued":
        return
    (claimed,) = await queue.claim("w", ["sync"], ["default"], 1, lease_seconds=10)
    if status == "running":
        return
    if status == "succeeded":
        assert await queue.complete(lease_of(claimed))
    elif status == "retrying":
        assert await queue.fail(claimed, "boom") == "retrying"
    elif status == "failed_permanent":
        assert await queue.fail(claimed, "boom", permanent=True) == "failed_permanent"
    elif status == "cancelled":
        await queue.request_cancel(job.id)
        assert await queue.mark_cancelled(lease_of(claimed))
    assert (await queue.get(job.id)).status == status


@pytest.mark.parametrize(
    ("status", "duplicate"),
    [
        ("queued", True),
        ("running", True),
        ("retrying", True),
        ("succeeded", True),
        ("failed_permanent", False),
        ("cancelled", False),
    ],
)
async def test_which_states_of_the_earlier_job_make_a_duplicate(
    queue: Queue, status: str, duplicate: bool
) -> None:
    await _holder_in(queue, status)
    again = await unique(queue)
    assert again.created is not duplicate


async def test_unique_states_chooses_the_states_that_count(queue: Queue) -> None:
    await _holder_in(queue, "succeeded")
    waiting_only = frozenset({"queued", "retrying"})
    assert (await unique(queue, unique_states=waiting_only)).created
    assert not (await unique(queue, unique_states=waiting_only)).created


async def test_unique_by_compares_only_the_fields_named(queue: Queue) -> None:
    by = ("account",)
    first = await unique(queue, {"account": 7, "at": 1}, unique_by=by)
    same_account = await unique(queue, {"account": 7, "at": 2}, unique_by=by)
    other_account = await unique(queue, {"account": 8, "at": 1}, unique_by=by)
    whole_payload = await unique(queue, {"account": 7, "at": 2})
    other_queue = await unique(queue, {"account": 7, "at": 1}, unique_by=by, queue="q2")
    assert first.created and not same_account.created
    assert same_account.job.id == first.job.id
    assert other_account.created and whole_payload.created and other_queue.created


async def test_unique_by_fields_named_in_another_order_are_the_same_fields(queue: Queue) -> None:
    first = await unique(queue, {"a": 1, "b": 2, "c": 3}, unique_by=("a", "b"))
    again = await unique(queue, {"a": 1, "b": 2, "c": 4}, unique_by=("b", "a"))
    assert first.created and not again.created


async def test_a_number_written_as_a_float_is_the_same_value_as_the_integer(queue: Queue) -> None:
    first = await unique(queue, {"a": 1, "b": [2]}, unique_by=("a", "b"))
    again = await unique(queue, {"a": 1.0, "b": [2.0]}, unique_by=("a", "b"))
    assert first.created and not again.created


async def test_a_unique_job_with_an_idempotency_key_or_unknown_states_is_refused(
    queue: Queue,
) -> None:
    with pytest.raises(InvalidJob, match="idempotency key"):
        await unique(queue, idempotency_key="k")
    with pytest.raises(InvalidJob, match="unique_states"):
        await unique(queue, unique_states=frozenset({"done"}))
    assert await count(queue) == 0


async def test_the_cleaner_deletes_expired_unique_keys(queue: Queue) -> None:
    passed = (await unique(queue)).job
    await unique(queue, {"account": 8})
    await queue.pool.execute(
        "UPDATE jobq_unique_keys SET expires_at = now() - interval '1s' WHERE job_id = $1",
        passed.id,
    )
    await Cleaner(queue, Settings()).run_once()
    assert await queue.pool.fetchval("SELECT count(*) FROM jobq_unique_keys") == 1


async def test_http_says_a_unique_duplicate_already_existed(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    app = create_app(Settings(), pool=pool)
    body = {"kind": "sync", "payload": {"account": 7, "n": 1}, "unique_for": 600,
            "unique_by": ["account"]}  # fmt: skip
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        first = await client.post("/jobs", json=body)
        again = await client.post("/jobs", json={**body, "payload": {"account": 7, "n": 2}})
        bad = await client.post("/jobs", json={**body, "unique_states": ["done"]})
        keyed = await client.post("/jobs", json=body, headers={"Idempotency-Key": "k1"})
    assert (first.status_code, first.headers["jobq-unique"]) == (201, "created")
    assert (again.status_code, again.headers["jobq-unique"]) == (200, "duplicate")
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["payload"] == {"account": 7, "n": 1}
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/problem+json")
    assert keyed.status_code == 422
    assert "idempotency key" in keyed.json()["detail"]
    assert await count(queue) == 1


# -- unique by the handler's declaration -----------------------------------------------------


def _unique_registry() -> Any:
    from jobq.registry import Registry

    registry = Registry()

    @registry.handler("sync", unique_for=HOUR, unique_by=["account"])
    async def sync(ctx: object, payload: dict) -> None: ...

    @registry.handler("plain")
    async def plain(ctx: object, payload: dict) -> None: ...

    return registry


async def test_a_handler_s_unique_options_make_every_enqueue_of_its_kind_unique(
    pool: asyncpg.Pool, queue: Queue
) -> None:
    q = Queue(pool, unique=_unique_registry().unique_defaults)
    first = await q.enqueue(NewJob(kind="sync", payload={"account": 7, "n": 1}))
    again = await q.enqueue(NewJob(kind="sync", payload={"account": 7, "n": 2}))
    assert first.created and not again.created and again.job.id == first.job.id
    assert (await q.enqueue(NewJob(kind="plain"))).created
    assert (await q.enqueue(NewJob(kind="plain"))).created


async def test_an_idempotency_key_takes_the_place_of_the_kind_s_unique_options(
    pool: asyncpg.Pool, queue: Queue
) -> None:
    q = Queue(pool, unique=_unique_registry().unique_defaults)
    await q.enqueue(NewJob(kind="sync", payload={"account": 7}))
    keyed = await q.enqueue(NewJob(kind="sync", payload={"account": 7}, idempotency_key="k"))
    assert keyed.created and await count(queue) == 2


async def test_a_batch_holding_a_unique_kind_is_refused(pool: asyncpg.Pool, queue: Queue) -> None:
    q = Queue(pool, unique=_unique_registry().unique_defaults)
    with pytest.raises(InvalidJob, match="unique_for"):
        await q.enqueue_many([NewJob(kind="plain"), NewJob(kind="sync")])
    assert await count(queue) == 0


def test_bad_unique_options_of_a_handler_are_a_value_error_at_registration() -> None:
    from jobq.registry import Registry

    with pytest.raises(ValueError, match="handler 'k': unique_for"):
        Registry().handler("k", unique_for=timedelta(0))
    with pytest.raises(ValueError, match="unique_states"):
        Registry().handler("k", unique_for=HOUR, unique_states=["done"])


async def test_http_applies_the_handler_s_unique_options(queue: Queue, pool: asyncpg.Pool) -> None:
    app = create_app(Settings(), pool=pool, registry=_unique_registry())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        first = await client.post("/jobs", json={"kind": "sync", "payload": {"account": 7}})
        again = await client.post("/jobs", json={"kind": "sync", "payload": {"account": 7}})
    assert (first.status_code, first.headers["jobq-unique"]) == (201, "created")
    assert (again.status_code, again.headers["jobq-unique"]) == (200, "duplicate")
    assert again.json()["id"] == first.json()["id"]


async def test_http_batch_refuses_a_unique_kind_naming_its_item(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    app = create_app(Settings(), pool=pool, registry=_unique_registry())
    jobs = [{"kind": "plain"}, {"kind": "sync", "payload": {"account": 7}}]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        r = await client.post("/jobs/batch", json={"jobs": jobs})
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["errors"]] == [["body", "jobs", 1, "unique_for"]]
    assert "one at a time" in r.json()["detail"] or "not in a batch" in r.text
    assert await count(queue) == 0


async def test_a_retry_of_a_unique_job_whose_key_another_job_holds_is_refused(
    pool: asyncpg.Pool, queue: Queue
) -> None:
    from jobq.queue.operator import UniqueHeld

    q = Queue(pool, unique=_unique_registry().unique_defaults)
    first = (await q.enqueue(NewJob(kind="sync", payload={"account": 7}))).job
    await q.request_cancel(first.id)  # a cancelled job does not hold its key
    second = await q.enqueue(NewJob(kind="sync", payload={"account": 7}))
    assert second.created
    with pytest.raises(UniqueHeld, match=str(second.job.id)):
        await q.retry(first.id)
    assert (await q.get(first.id)).status == "cancelled"


async def test_a_retried_unique_job_takes_its_key_back(pool: asyncpg.Pool, queue: Queue) -> None:
    q = Queue(pool, unique=_unique_registry().unique_defaults)
    first = (await q.enqueue(NewJob(kind="sync", payload={"account": 7}))).job
    await q.request_cancel(first.id)
    assert (await q.retry(first.id)).status == "queued"
    again = await q.enqueue(NewJob(kind="sync", payload={"account": 7}))
    assert not again.created and again.job.id == first.id


async def test_http_retry_of_a_unique_job_another_holds_is_a_409_problem(
    queue: Queue, pool: asyncpg.Pool
) -> None:
    app = create_app(Settings(), pool=pool, registry=_unique_registry())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        first = await client.post("/jobs", json={"kind": "sync", "payload": {"account": 7}})
        await client.post(f"/jobs/{first.json()['id']}/cancel")
        second = await client.post("/jobs", json={"kind": "sync", "payload": {"account": 7}})
        assert second.status_code == 201
        r = await client.post(f"/jobs/{first.json()['id']}/retry")
    assert r.status_code == 409, r.text
    assert r.json()["error"] == "invalid_state" and second.json()["id"] in r.json()["detail"]
