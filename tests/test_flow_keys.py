"""The concurrency key a kind or queue declares as a payload field: derived by the database at
every insert, however the job is enqueued (docs/flow-control.md, "Where the key comes from")."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import orjson
import pytest

from jobq import txn
from jobq.queue import InvalidJob, Limits, NewJob, Queue
from jobq.registry import Registry

BY_TENANT = Limits(key_path=("tenant",))


async def _declare(queue: Queue, kinds: dict[str, Limits], queues: dict[str, Limits]) -> None:
    await queue.declare_limits("w", kinds, queues)


async def _keys(queue: Queue) -> list[str | None]:
    rows = await queue.pool.fetch("SELECT concurrency_key FROM jobs ORDER BY id")
    return [r["concurrency_key"] for r in rows]


async def test_a_kind_s_key_field_keys_a_job_of_queue_enqueue(queue: Queue) -> None:
    await _declare(queue, {"a": BY_TENANT}, {})
    job = (await queue.enqueue(NewJob(kind="a", payload={"tenant": "acme"}))).job
    assert job.concurrency_key == "acme"


async def test_a_kind_s_key_field_keys_a_job_with_an_idempotency_key(queue: Queue) -> None:
    await _declare(queue, {"a": BY_TENANT}, {})
    new = NewJob(kind="a", payload={"tenant": "acme"}, idempotency_key="k1")
    assert (await queue.enqueue(new)).job.concurrency_key == "acme"


async def test_a_kind_s_key_field_keys_the_jobs_of_enqueue_many(queue: Queue) -> None:
    await _declare(queue, {"a": BY_TENANT}, {})
    await queue.enqueue_many(
        [NewJob(kind="a", payload={"tenant": f"t{i}"}) for i in range(3)] + [NewJob(kind="b")]
    )
    assert await _keys(queue) == ["t0", "t1", "t2", None]


async def test_a_kind_s_key_field_keys_the_jobs_of_a_keyed_enqueue_many(queue: Queue) -> None:
    await _declare(queue, {"a": BY_TENANT}, {})
    await queue.enqueue_many(
        [NewJob(kind="a", payload={"tenant": "t"}, idempotency_key="k"), NewJob(kind="a")]
    )
    assert await _keys(queue) == ["t", None]


async def test_a_kind_s_key_field_keys_the_jobs_of_enqueue_jobs(queue: Queue) -> None:
    # The statement POST /jobs/batch runs.
    await _declare(queue, {"a": BY_TENANT}, {})
    stored = await queue.enqueue_jobs([NewJob(kind="a", payload={"tenant": 9})])
    assert [job.concurrency_key for job, _ in stored] == ["9"]


async def test_a_kind_s_key_field_keys_a_job_of_the_transactional_enqueue(
    queue: Queue, dsn: str
) -> None:
    await _declare(queue, {"a": BY_TENANT}, {})
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await txn.enqueue(conn, NewJob(kind="a", payload={"tenant": "acme"}))
            await txn.enqueue_many(conn, [NewJob(kind="a", payload={"tenant": "b"})])
    finally:
        await conn.close()
    assert await _keys(queue) == ["acme", "b"]


async def test_a_kind_s_key_field_keys_a_unique_job(queue: Queue) -> None:
    await _declare(queue, {"a": BY_TENANT}, {})
    new = NewJob(kind="a", payload={"tenant": "acme"})
    result = await queue.enqueue(new, unique_for=timedelta(minutes=1))
    assert result.job.concurrency_key == "acme"


async def test_a_key_given_at_enqueue_is_kept_over_the_derived_one(queue: Queue) -> None:
    await _declare(queue, {"a": BY_TENANT}, {})
    new = NewJob(kind="a", payload={"tenant": "acme"}, concurrency_key="given")
    assert (await queue.enqueue(new)).job.concurrency_key == "given"


async def test_a_queue_s_key_field_keys_its_jobs_of_any_kind(queue: Queue) -> None:
    await _declare(queue, {}, {"tenants": Limits(fair=True, key_path=("account",))})
    await queue.enqueue_many(
        [NewJob(kind=k, queue="tenants", payload={"account": k}) for k in ("x", "y")]
        + [NewJob(kind="x", payload={"account": "other-queue"})]
    )
    assert await _keys(queue) == ["x", "y", None]


async def test_a_kind_s_key_field_comes_before_its_queue_s(queue: Queue) -> None:
    await _declare(queue, {"a": BY_TENANT}, {"default": Limits(key_path=("account",))})
    new = NewJob(kind="a", payload={"tenant": "by-kind", "account": "by-queue"})
    assert (await queue.enqueue(new)).job.concurrency_key == "by-kind"


async def test_a_key_path_reaches_a_nested_field(queue: Queue) -> None:
    await _declare(queue, {"a": Limits(key_path=("account", "id"))}, {})
    new = NewJob(kind="a", payload={"account": {"id": "acme"}})
    assert (await queue.enqueue(new)).job.concurrency_key == "acme"


@pytest.mark.parametrize(
    ("value", "key"),
    [("acme", "acme"), (42, "42"), (-7, "-7"), (1.5, None), (True, None), (None, None),
     ({"x": 1}, None), ([1], None), ("", None), ("a\nb", None), ("k" * 256, None)],
)  # fmt: skip
async def test_a_derived_key_is_a_valid_string_or_an_integer_else_none(
    queue: Queue, value: object, key: str | None
) -> None:
    await _declare(queue, {"a": BY_TENANT}, {})
    new = NewJob(kind="a", payload={"tenant": value})
    assert (await queue.enqueue(new)).job.concurrency_key == key


async def test_the_database_derives_the_key_the_handler_derives(queue: Queue) -> None:
    registry = Registry()

    @registry.handler("a", concurrency_key=("account", "id"))
    async def a(ctx: object, payload: dict) -> None: ...

    await _declare(queue, registry.kind_limits, {})
    payloads = [{"account": {"id": v}} for v in ("acme", 42, None)] + [{}]
    for payload in payloads:
        stored = (await queue.enqueue(NewJob(kind="a", payload=payload))).job.concurrency_key
        assert stored == registry["a"].key_of(payload)


def _handler_key(registry: Registry, kind: str, payload: dict) -> str | None:
    """The key the registry derives, None where it refuses the value."""
    try:
        return registry[kind].key_of(payload)
    except InvalidJob:
        return None


@pytest.mark.parametrize(
    "value", [1e16, 1e20, 100.0, -0.0, 1.5, 10**18, -(10**18), 0, 7, "7", "1e2"]
)
async def test_the_database_and_the_handler_agree_on_the_key_of_a_number(
    queue: Queue, value: object
) -> None:
    registry = _tenant_registry()
    await _declare(queue, registry.kind_limits, {})
    payload = {"tenant": value}
    stored = (await queue.enqueue(NewJob(kind="a", payload=payload))).job.concurrency_key
    assert stored == _handler_key(registry, "a", payload)


@pytest.mark.parametrize(
    "text", ["1e2", "1E+2", "100.0", "1.0", "-0", "100", "-12", "0", "9" * 256, '"x"']
)
async def test_the_database_reads_a_number_as_the_json_text_writes_it(
    queue: Queue, text: str
) -> None:
    # The same JSON text read by the registry (as the API reads a body) and by the database.
    payload_text = '{"tenant": ' + text + "}"
    derived = await queue.pool.fetchval(
        "SELECT jobq_key_from_json($1::text::json, '{tenant}')", payload_text
    )
    assert derived == _handler_key(_tenant_registry(), "a", orjson.loads(payload_text))


def _tenant_registry() -> Registry:
    registry = Registry()

    @registry.handler("a", concurrency_key="tenant")
    async def a(ctx: object, payload: dict) -> None: ...

    return registry


async def test_a_declaration_without_a_key_field_stops_deriving_it(queue: Queue) -> None:
    await _declare(queue, {"a": BY_TENANT}, {})
    await _declare(queue, {"a": Limits()}, {})  # the last worker to start wins
    new = NewJob(kind="a", payload={"tenant": "acme"})
    assert (await queue.enqueue(new)).job.concurrency_key is None
    assert await queue.pool.fetchval("SELECT count(*) FROM jobq_flow_controls") == 0


async def test_a_kind_with_only_a_key_field_is_neither_paused_nor_limited(queue: Queue) -> None:
    await _declare(queue, {"a": BY_TENANT}, {})
    await queue.enqueue(NewJob(kind="a", payload={"tenant": "acme"}))
    assert await queue.flow_states() == []
    assert not await queue.limits_apply(["a"], ["default"])
    claimed = await queue.claim("w", ["a"], ["default"], 10, lease_seconds=30)
    assert [j.concurrency_key for j in claimed] == ["acme"]


async def test_a_resume_keeps_a_kind_s_key_field(queue: Queue) -> None:
    await _declare(queue, {"a": BY_TENANT}, {})
    await queue.pause("kind", "a")
    await queue.resume("kind", "a")
    new = NewJob(kind="a", payload={"tenant": "acme"})
    assert (await queue.enqueue(new)).job.concurrency_key == "acme"


def test_a_handler_s_key_field_is_declared_with_its_limits_and_a_function_is_not() -> None:
    registry = Registry()

    @registry.handler("by-field", concurrency_key="tenant")
    async def by_field(ctx: object, payload: dict) -> None: ...

    @registry.handler("by-function", concurrency_key=lambda p: p["tenant"])
    async def by_function(ctx: object, payload: dict) -> None: ...

    registry.queue("q", concurrency_key=("account", "id"))
    assert registry.kind_limits["by-field"].key_path == ("tenant",)
    assert registry.kind_limits["by-function"].key_path is None
    assert registry.queue_limits["q"].key_path == ("account", "id")


@pytest.mark.parametrize("bad", ["", (), ("a", ""), ("x",) * 17, 5, ["tenant"]])
def test_a_bad_key_field_is_refused_at_declaration(bad: object) -> None:
    registry = Registry()
    with pytest.raises(TypeError, match="concurrency_key"):
        registry.handler("k", concurrency_key=bad)  # type: ignore[arg-type]


async def test_a_retried_job_keeps_its_concurrency_key(queue: Queue) -> None:
    job = (await queue.enqueue(NewJob(kind="a", concurrency_key="acme"))).job
    await queue.request_cancel(job.id)
    assert (await queue.retry(job.id)).concurrency_key == "acme"


def _cli_registry() -> Registry:
    registry = Registry()

    @registry.handler("by-function", concurrency_key=lambda p: p["account"]["id"])
    async def by_function(ctx: object, payload: dict) -> None: ...

    return registry


def test_jobq_enqueue_with_app_derives_a_function_key() -> None:
    from jobq import cli

    job = cli._check_with_registry(
        _cli_registry(), NewJob(kind="by-function", payload={"account": {"id": 3}}), ""
    )
    assert job.concurrency_key == "3"


def test_jobq_enqueue_with_app_refuses_a_key_that_conflicts_with_the_derived_one() -> None:
    from jobq import cli

    new = NewJob(kind="by-function", payload={"account": {"id": 3}}, concurrency_key="4")
    with pytest.raises(cli.InputError, match="conflicts with the key derived from payload"):
        cli._check_with_registry(_cli_registry(), new, "")


async def test_a_kind_s_key_field_keys_a_periodic_job(queue: Queue) -> None:
    from datetime import UTC, datetime

    from jobq.maintenance.scheduler import Scheduler
    from jobq.periodic import Schedule

    await queue.pool.execute("TRUNCATE jobq_schedules")
    await _declare(queue, {"a": BY_TENANT}, {})
    schedule = Schedule(name="s", kind="a", every=timedelta(minutes=1), payload={"tenant": "t"})
    clock = [datetime(2026, 6, 1, 10, 0, 30, tzinfo=UTC)]
    scheduler = Scheduler(queue, [schedule], clock=lambda: clock[0])
    await scheduler.tick()  # declares the schedule; its first tick is the next minute
    clock[0] = datetime(2026, 6, 1, 10, 1, 1, tzinfo=UTC)
    assert len(await scheduler.tick()) == 1
    assert await _keys(queue) == ["t"]
