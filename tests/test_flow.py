"""Flow control in the queue core: pause and resume, concurrency limits, rate limits, fair
share, against a real PostgreSQL (docs/flow-control.md)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import pytest

from jobq.queue import Limits, NewJob, Queue, flow, lease_of
from tests.helpers import wait_for

T = TypeVar("T")

KINDS = ["a", "b"]
QUEUES = ["default", "other"]


@contextlib.asynccontextmanager
async def _queued_on_row(
    queue: Queue, kind: str, claim: Coroutine[Any, Any, T]
) -> AsyncIterator[asyncio.Task[T]]:
    """`claim` running, queued on the lock of `kind`'s limit row, which another transaction
    holds until the block ends."""
    async with queue.pool.acquire() as holder:
        tx = holder.transaction()
        await tx.start()
        await holder.execute(
            "SELECT 1 FROM jobq_flow_controls WHERE scope = 'kind' AND name = $1 FOR UPDATE", kind
        )
        task = asyncio.create_task(claim)
        await wait_for(
            lambda: queue.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database() AND query LIKE '%jobq_claim_limited%'"
            ),
            timeout=10,
        )
        try:
            yield task
        finally:
            await tx.commit()


async def _claim(queue: Queue, n: int = 100, *, limited: bool = False, worker: str = "w") -> list:
    claim = queue.claim_limited if limited else queue.claim
    return await claim(worker, KINDS, QUEUES, n, lease_seconds=30)


# -- pause and resume ------------------------------------------------------------------------


async def test_a_paused_queue_s_jobs_are_not_claimed_and_enqueue_still_works(
    queue: Queue,
) -> None:
    await queue.pause("queue", "default")
    created = await queue.enqueue(NewJob(kind="a"))
    assert created.created and created.job.status == "queued"
    await queue.enqueue(NewJob(kind="a", queue="other"))
    claimed = await _claim(queue)
    assert [j.queue for j in claimed] == ["other"]
    assert await _claim(queue, limited=True) == []


async def test_a_resumed_queue_s_jobs_are_claimed_again(queue: Queue) -> None:
    await queue.pause("queue", "default")
    job = (await queue.enqueue(NewJob(kind="a"))).job
    assert await _claim(queue) == []
    state = await queue.resume("queue", "default")
    assert not state.paused
    assert [j.id for j in await _claim(queue)] == [job.id]


async def test_a_paused_kind_is_not_claimed_in_any_queue(queue: Queue) -> None:
    await queue.pause("kind", "a")
    await queue.enqueue_many(
        [NewJob(kind="a"), NewJob(kind="a", queue="other"), NewJob(kind="b", queue="other")]
    )
    assert [j.kind for j in await _claim(queue)] == ["b"]
    await queue.resume("kind", "a")
    assert sorted(j.queue for j in await _claim(queue)) == ["default", "other"]


async def test_pausing_a_queue_with_no_jobs_yet_is_kept_and_listed(queue: Queue) -> None:
    first = await queue.pause("queue", "later")
    again = await queue.pause("queue", "later")
    assert first.paused and again.paused_at == first.paused_at  # idempotent
    infos = {i.queue: i for i in await queue.queue_infos()}
    assert infos["later"].state.paused and infos["later"].counts == {}


async def test_a_pause_is_stored_so_a_new_connection_pool_still_sees_it(
    queue: Queue, dsn: str
) -> None:
    await queue.pause("queue", "default")
    await queue.enqueue(NewJob(kind="a"))
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    try:
        assert await _claim(Queue(pool)) == []
    finally:
        await pool.close()


async def test_bad_pause_names_are_refused(queue: Queue) -> None:
    with pytest.raises(ValueError):
        await queue.pause("queue", "")
    with pytest.raises(ValueError):
        await queue.pause("queue", "x" * 256)
    with pytest.raises(ValueError):
        await queue.pause("tenant", "a")


# -- declarations ----------------------------------------------------------------------------


def test_a_limit_too_large_for_the_database_is_refused_at_declaration() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        Limits.declare(max_concurrency=2**31)


def test_a_rate_too_large_for_the_claim_is_refused_at_declaration() -> None:
    # Accepted before, its default bucket overflowed the claim's integer on every claim.
    with pytest.raises(ValueError, match="rate_limit"):
        Limits.declare(rate_limit="10000000000/s")
    assert Limits.declare(rate_limit=f"{2**31 - 1}/s").burst == 2**31 - 1


def test_limit_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        Limits.declare(max_concurrency=0)
    with pytest.raises(ValueError, match="max_per_key"):
        Limits.declare(max_per_key=-1)
    with pytest.raises(ValueError, match="rate_limit"):
        Limits.declare(rate_limit="fast")
    with pytest.raises(ValueError, match="rate_limit"):
        Limits.declare(rate_limit="0/s")
    with pytest.raises(ValueError, match="rate_burst"):
        Limits.declare(rate_burst=3)
    assert Limits.declare(rate_limit="120/min").rate == 2.0
    assert Limits.declare(max_concurrency=2**31 - 1).max_concurrency == 2**31 - 1
    assert Limits.declare(rate_limit="50/s").burst == 50.0


async def test_the_last_declaration_wins_and_a_pause_is_kept(queue: Queue) -> None:
    await queue.pause("kind", "a")
    await queue.declare_limits("w1", {"a": Limits(max_concurrency=5)}, {})
    await queue.declare_limits("w2", {"a": Limits(max_concurrency=7)}, {})
    (state,) = [s for s in await queue.flow_states() if s.name == "a"]
    assert state.max_concurrency == 7 and state.paused
    await queue.declare_limits("w3", {"a": Limits()}, {})
    (state,) = [s for s in await queue.flow_states() if s.name == "a"]
    assert state.max_concurrency is None and state.paused
    await queue.resume("kind", "a")
    assert await queue.flow_states() == []


async def test_the_plain_claim_leaves_limited_kinds_to_the_limited_claim(queue: Queue) -> None:
    await queue.declare_limits("w", {"a": Limits(max_concurrency=1)}, {})
    await queue.enqueue_many([NewJob(kind="a"), NewJob(kind="a"), NewJob(kind="b")])
    assert await queue.limits_apply(KINDS, QUEUES)
    assert [j.kind for j in await _claim(queue)] == ["b"]
    assert [j.kind for j in await _claim(queue, limited=True)] == ["a"]


async def test_unkeyed_jobs_of_a_limited_kind_are_claimed_behind_jobs_of_kinds_not_claimed(
    queue: Queue,
) -> None:
    # A per-key limit on "a" makes the queue keyed; "b"'s jobs have no key. Jobs of a kind
    # this worker does not claim ("c": another service's, or paused) come first.
    await queue.declare_limits(
        "w", {"a": Limits(max_per_key=1), "b": Limits(max_concurrency=5)}, {}
    )
    await queue.enqueue_many([NewJob(kind="c") for _ in range(12)])
    await queue.enqueue_many([NewJob(kind="b") for _ in range(3)])
    assert [j.kind for j in await _claim(queue, 10, limited=True)] == ["b", "b", "b"]


# -- concurrency limits ----------------------------------------------------------------------


async def _running(queue: Queue, where: str = "true") -> int:
    return int(
        await queue.pool.fetchval(f"SELECT count(*) FROM jobs WHERE status = 'running' AND {where}")
    )


async def test_a_global_limit_holds_under_a_race_of_many_claimers(queue: Queue) -> None:
    await queue.declare_limits("w", {"a": Limits(max_concurrency=7)}, {})
    await queue.enqueue_many([NewJob(kind="a") for _ in range(200)])
    got = await asyncio.gather(*(_claim(queue, 5, limited=True, worker=f"w{i}") for i in range(16)))
    assert sum(len(g) for g in got) == 7
    assert await _running(queue) == 7
    assert await _claim(queue, limited=True) == []


async def test_a_per_key_limit_holds_under_a_race_of_many_claimers(queue: Queue) -> None:
    await queue.declare_limits("w", {"a": Limits(max_per_key=2)}, {})
    await queue.enqueue_many([NewJob(kind="a", concurrency_key=f"t{i % 5}") for i in range(100)])
    await asyncio.gather(*(_claim(queue, 10, limited=True, worker=f"w{i}") for i in range(16)))
    per_key = await queue.pool.fetch(
        "SELECT concurrency_key, count(*) AS n FROM jobs WHERE status = 'running'"
        " GROUP BY concurrency_key"
    )
    assert {r["concurrency_key"]: r["n"] for r in per_key} == {f"t{i}": 2 for i in range(5)}


async def test_jobs_without_a_key_share_one_key_s_bound_under_a_race(queue: Queue) -> None:
    # A payload missing the declared field gives no key: such jobs are one key, not unbounded.
    await queue.declare_limits("w", {"a": Limits(max_per_key=1)}, {})
    await queue.enqueue_many([NewJob(kind="a") for _ in range(4)])
    got = await asyncio.gather(*(_claim(queue, 4, limited=True, worker=f"w{i}") for i in range(8)))
    assert sum(len(g) for g in got) == 1
    assert await _claim(queue, limited=True) == []  # the running one counts against the bound


async def test_a_queue_s_per_key_limit_bounds_jobs_without_a_key_beside_keyed_ones(
    queue: Queue,
) -> None:
    await queue.declare_limits("w", {}, {"default": Limits(max_per_key=2)})
    await queue.enqueue_many([NewJob(kind=k) for k in "abab"])
    await queue.enqueue_many([NewJob(kind="a", concurrency_key="t") for _ in range(3)])
    claimed = await _claim(queue, 10, limited=True)
    assert sorted((j.concurrency_key or "") for j in claimed) == ["", "", "t", "t"]


async def test_a_kind_s_and_its_queue_s_per_key_limits_both_hold_in_one_claim(
    queue: Queue,
) -> None:
    # The kind's bound (1 of a) binds before the queue's (3 of the key).
    await queue.declare_limits(
        "w", {"a": Limits(max_per_key=1)}, {"default": Limits(max_per_key=3)}
    )
    await queue.enqueue_many([NewJob(kind=k, concurrency_key="t") for k in "ababab"])
    claimed = await _claim(queue, 10, limited=True)
    assert sorted(j.kind for j in claimed) == ["a", "b"]


async def test_a_worker_s_second_keyed_queue_is_claimed_beside_a_backlog_in_the_first(
    queue: Queue,
) -> None:
    # A claim stops locking keys once they cover what it asks for: the queues' keys take
    # turns, or the first queue's backlog would take every claim.
    await queue.declare_limits("w", {"a": Limits(max_per_key=5)}, {})
    await queue.enqueue_many(
        [NewJob(kind="a", queue="other", concurrency_key=f"o{i}") for i in range(5)]
    )
    await queue.enqueue_many(
        [NewJob(kind="a", queue="default", concurrency_key=f"d{i % 10}") for i in range(200)]
    )
    claimed = await _claim(queue, 4, limited=True)
    assert "other" in {j.queue for j in claimed}  # its jobs are the oldest


async def test_a_key_whose_bounded_kind_is_full_still_starts_jobs_of_an_unbounded_kind(
    queue: Queue,
) -> None:
    await queue.declare_limits("w", {"a": Limits(max_per_key=1)}, {})
    await queue.enqueue(NewJob(kind="a", concurrency_key="t"))
    assert [j.kind for j in await _claim(queue, 1, limited=True)] == ["a"]
    await queue.enqueue(NewJob(kind="b", concurrency_key="t"))
    assert [j.kind for j in await _claim(queue, 5, limited=True)] == ["b"]


async def test_fair_share_under_a_per_key_limit_takes_one_job_of_each_key_first(
    queue: Queue,
) -> None:
    await queue.declare_limits("w", {}, {"default": Limits(fair=True, max_per_key=5)})
    await queue.enqueue_many(
        [NewJob(kind="a", concurrency_key=f"t{i}") for i in range(10) for _ in range(5)]
    )
    claimed = await _claim(queue, 10, limited=True)
    assert sorted(str(j.concurrency_key) for j in claimed) == [f"t{i}" for i in range(10)]


async def test_a_per_key_limit_holds_under_a_race_when_keys_outnumber_the_walk(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flow, "KEY_WALK", 4)
    await queue.declare_limits("w", {"a": Limits(max_per_key=2)}, {})
    await queue.enqueue_many([NewJob(kind="a", concurrency_key=f"t{i % 20}") for i in range(100)])
    running: dict[str, int] = {}
    # Claims that each see at most 4 keys (and pass over those a concurrent claim holds): round
    # after round they reach all 20, never more than 2 of a key.
    for _ in range(40):
        await asyncio.gather(*(_claim(queue, 3, limited=True, worker=f"w{i}") for i in range(8)))
        per_key = await queue.pool.fetch(
            "SELECT concurrency_key, count(*) AS n FROM jobs WHERE status = 'running'"
            " GROUP BY concurrency_key"
        )
        running = {r["concurrency_key"]: r["n"] for r in per_key}
        assert max(running.values()) <= 2
        if len(running) == 20 and set(running.values()) == {2}:
            break
    assert running == {f"t{i}": 2 for i in range(20)}


async def test_claims_of_different_keys_under_a_per_key_limit_do_not_wait_for_each_other(
    queue: Queue,
) -> None:
    # Per-key bounds depend on each key's own jobs only: a claim holding some keys (its
    # transaction still open) must not stall the claims of the other keys.
    await queue.declare_limits("w", {"a": Limits(max_per_key=1)}, {})
    await queue.enqueue_many([NewJob(kind="a", concurrency_key=f"t{i}") for i in range(4)])
    async with queue.pool.acquire() as conn, conn.transaction():
        held = await conn.fetch(
            flow._CLAIM_LIMITED_CALL, "w1", KINDS, QUEUES, 2, 30.0, [], [], 3, flow.KEY_WALK
        )
        assert sorted(r["concurrency_key"] for r in held) == ["t0", "t1"]
        other = await asyncio.wait_for(_claim(queue, 4, limited=True, worker="w2"), 5)
        assert sorted(str(j.concurrency_key) for j in other) == ["t2", "t3"]


async def test_a_claim_waiting_for_a_limit_s_row_holds_no_key_another_claim_needs(
    queue: Queue,
) -> None:
    # Keys are locked after the rows: a claim queued on another kind's row must not keep the
    # per-key kind's keys from the claims that need no row.
    await queue.declare_limits(
        "w", {"a": Limits(max_per_key=1), "b": Limits(max_concurrency=5)}, {}
    )
    await queue.enqueue_many([NewJob(kind="a", concurrency_key=f"t{i}") for i in range(4)])
    claim = queue.claim_limited("w1", KINDS, QUEUES, 4, lease_seconds=30)
    async with _queued_on_row(queue, "b", claim) as waiting:
        other = await asyncio.wait_for(
            queue.claim_limited("w2", ["a"], QUEUES, 4, lease_seconds=30), 5
        )
    assert sorted(str(j.concurrency_key) for j in other) == ["t0", "t1", "t2", "t3"]
    assert await asyncio.wait_for(waiting, 10) == []


async def test_a_claim_that_locked_no_key_leaves_the_key_buckets_alone(queue: Queue) -> None:
    # A per-key rate stored while the claim waited for a row came after its walk: it locked no
    # key, so the keys' buckets are other claims' to read and write (a refilled one included).
    await queue.declare_limits("w", {"b": Limits(max_concurrency=5)}, {})
    await queue.enqueue_many([NewJob(kind="a")])
    claim = queue.claim_limited("w1", KINDS, QUEUES, 4, lease_seconds=30)
    async with _queued_on_row(queue, "b", claim) as waiting:
        limits = Limits.declare(rate_limit_per_key="1/s", rate_burst_per_key=1)
        await queue.declare_limits("w2", {"a": limits}, {})
        await queue.pool.execute(
            "INSERT INTO jobq_flow_key_buckets (scope, name, key, tokens, refilled_at)"
            " VALUES ('kind', 'a', chr(30), 0, now() - interval '1 hour')"
        )
    assert await asyncio.wait_for(waiting, 10) == []
    assert await queue.pool.fetchval("SELECT count(*) FROM jobq_flow_key_buckets") == 1


async def test_a_per_key_claim_goes_on_to_more_keys_when_the_first_have_fewer_jobs_than_room(
    queue: Queue,
) -> None:
    # A claim locks keys until they cover what it asks for: a key's share is its due jobs, not
    # only its limit's room (tenants with a job or two each).
    await queue.declare_limits("w", {"a": Limits(max_per_key=3)}, {})
    await queue.enqueue_many([NewJob(kind="a", concurrency_key=k) for k in "abbccc"])
    claimed = await _claim(queue, 6, limited=True)
    assert sorted(str(j.concurrency_key) for j in claimed) == list("abbccc")


async def test_a_queue_limit_counts_every_kind_in_it(queue: Queue) -> None:
    await queue.declare_limits("w", {}, {"default": Limits(max_concurrency=3)})
    await queue.enqueue_many([NewJob(kind=k) for k in "abababab"])
    assert len(await _claim(queue, limited=True)) == 3
    assert await _claim(queue, limited=True) == []


async def test_a_bound_declared_while_a_claim_waits_for_its_locks_starts_nothing_in_that_claim(
    queue: Queue,
) -> None:
    # The claim locked the rows that existed when it asked for them; a limit stored since (a
    # worker starting) is not under a lock it holds, so it must not apply it unlocked: two
    # such claims could both see the one free slot.
    await queue.declare_limits("w", {"a": Limits(max_concurrency=10)}, {})
    await queue.enqueue_many([NewJob(kind="b") for _ in range(3)])
    claim = queue.claim_limited_held("w", KINDS, QUEUES, 10, lease_seconds=30)
    async with _queued_on_row(queue, "a", claim) as waiting:
        await queue.declare_limits("w2", {"b": Limits(max_concurrency=1)}, {})
    first = await asyncio.wait_for(waiting, 10)
    assert (first.jobs, first.held_back) == ([], True)
    assert len(await _claim(queue, 10, limited=True)) == 1


async def test_slots_free_up_when_jobs_end_fail_or_are_released(queue: Queue) -> None:
    await queue.declare_limits("w", {"a": Limits(max_concurrency=2)}, {})
    await queue.enqueue_many([NewJob(kind="a", max_attempts=5) for _ in range(10)])
    one, two = await _claim(queue, limited=True)
    assert await _claim(queue, limited=True) == []
    assert await queue.complete(lease_of(one))
    (three,) = await _claim(queue, limited=True)
    assert await queue.fail(two, "boom") == "retrying"
    (four,) = await _claim(queue, limited=True)
    assert await queue.release([lease_of(three)])
    (five,) = await _claim(queue, limited=True)
    assert await _claim(queue, limited=True) == []
    assert {four.id, five.id}.isdisjoint({one.id, two.id})


async def test_a_slot_frees_up_when_its_job_is_rescued(queue: Queue) -> None:
    await queue.declare_limits("w", {"a": Limits(max_concurrency=1)}, {})
    await queue.enqueue_many([NewJob(kind="a"), NewJob(kind="a")])
    (job,) = await _claim(queue, limited=True)
    await queue.pool.execute(
        "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = $1", job.id
    )
    assert await _claim(queue, limited=True) == []
    assert [r.job_id for r in await queue.rescue()] == [job.id]
    assert len(await _claim(queue, limited=True)) == 1


async def test_a_slot_frees_up_when_its_job_is_cancelled(queue: Queue) -> None:
    await queue.declare_limits("w", {"a": Limits(max_concurrency=1)}, {})
    await queue.enqueue_many([NewJob(kind="a"), NewJob(kind="a")])
    (job,) = await _claim(queue, limited=True)
    await queue.request_cancel(job.id)
    assert await _claim(queue, limited=True) == []  # still running until the handler stops
    assert await queue.mark_cancelled(lease_of(job))
    assert len(await _claim(queue, limited=True)) == 1


# -- rate limits -----------------------------------------------------------------------------


async def test_a_rate_limit_starts_a_full_bucket_then_refills_at_the_rate(queue: Queue) -> None:
    await queue.declare_limits("w", {"a": Limits.declare(rate_limit="10/s", rate_burst=3)}, {})
    await queue.enqueue_many([NewJob(kind="a") for _ in range(20)])
    assert len(await _claim(queue, limited=True)) == 3
    assert await _claim(queue, limited=True) == []
    # 0.35 s later, three tokens more have come: the bucket is read at the claim's time.
    await queue.pool.execute(
        "UPDATE jobq_flow_controls SET refilled_at = refilled_at - interval '350 ms'"
    )
    assert len(await _claim(queue, limited=True)) == 3
    attempts = await queue.pool.fetchval("SELECT sum(attempts) FROM jobs WHERE status = 'queued'")
    assert attempts == 0  # those waiting for a token spent no attempt


# -- fair share ------------------------------------------------------------------------------


async def test_fair_share_takes_keys_in_turn(queue: Queue) -> None:
    await queue.declare_limits("w", {}, {"default": Limits(fair=True)})
    old = datetime.now(UTC) - timedelta(minutes=5)
    await queue.enqueue_many(
        [NewJob(kind="a", concurrency_key="big", run_at=old + timedelta(seconds=i))
         for i in range(50)]
        + [NewJob(kind="a", concurrency_key="small"), NewJob(kind="a", concurrency_key="mid"),
           NewJob(kind="a", concurrency_key="mid")]
    )  # fmt: skip
    claimed = await _claim(queue, 4, limited=True)
    assert sorted(j.concurrency_key for j in claimed[:3]) == ["big", "mid", "small"]
    assert claimed[3].concurrency_key in ("big", "mid")
    # Without fair share the oldest jobs go first: all of the big tenant's.
    await queue.declare_limits("w", {}, {"default": Limits()})
    assert {j.concurrency_key for j in await _claim(queue, 10)} == {"big"}


async def test_claims_that_walk_fewer_keys_than_wait_still_serve_every_key_in_turn(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flow, "KEY_WALK", 3)
    await queue.declare_limits("w", {}, {"default": Limits(fair=True)})
    await queue.enqueue_many(
        [NewJob(kind="a", concurrency_key=f"k{k}") for _ in range(3) for k in range(10)]
    )
    rounds = [[j.concurrency_key for j in await _claim(queue, 2, limited=True)] for _ in range(5)]
    assert rounds == [[f"k{k}", f"k{k + 1}"] for k in range(0, 10, 2)]
    # Once around, the walk starts again at the first key.
    assert [j.concurrency_key for j in await _claim(queue, 2, limited=True)] == ["k0", "k1"]


async def test_a_kind_no_limit_covers_does_not_wait_behind_a_limited_backlog(
    queue: Queue, dsn: str
) -> None:
    # A worker that runs a limited kind claims the kinds no limit covers with the plain claim
    # too: they must not queue behind the limited kind's backlog (30 s of it here).
    from jobq import JobContext, Registry
    from tests.test_worker import finished, running

    registry = Registry()

    @registry.handler("held", concurrency_key="tenant", max_per_key=1)
    async def held(ctx: JobContext, payload: dict[str, str]) -> None:
        await asyncio.sleep(1)

    @registry.handler("free")
    async def free(ctx: JobContext, payload: dict[str, str]) -> None:
        return None

    await queue.enqueue_many([registry.new_job("held", {"tenant": "t"}) for _ in range(30)])
    free_ids = await queue.enqueue_many([NewJob(kind="free") for _ in range(3)])
    async with running(dsn, registry):
        for job_id in free_ids:
            assert (await finished(queue, job_id, timeout=10)).status == "succeeded"


# -- what a limited claim tells the worker ---------------------------------------------------


async def _held(queue: Queue, n: int) -> tuple[int, bool]:
    claim = await queue.claim_limited_held("w", KINDS, QUEUES, n, lease_seconds=30)
    return len(claim.jobs), claim.held_back


async def test_a_limited_claim_that_took_all_that_waits_holds_nothing_back(queue: Queue) -> None:
    await queue.declare_limits("w", {"a": Limits(max_concurrency=5, max_per_key=3)}, {})
    assert await _held(queue, 10) == (0, False)
    await queue.enqueue_many([NewJob(kind="a", concurrency_key="k"), NewJob(kind="a")])
    assert await _held(queue, 10) == (2, False)


async def test_a_limited_claim_of_paused_queues_holds_nothing_back(queue: Queue) -> None:
    # Time does not end a pause (a resume does): nothing to try again soon for.
    await queue.declare_limits("w", {"a": Limits(max_concurrency=5)}, {})
    await queue.enqueue_many([NewJob(kind="a"), NewJob(kind="a", queue="other")])
    await queue.pause("queue", "default")
    await queue.pause("queue", "other")
    assert await _held(queue, 10) == (0, False)


@pytest.mark.parametrize(
    ("kind_limits", "queue_limits", "key_walk"),
    [
        (Limits(max_concurrency=2), Limits(), flow.KEY_WALK),
        (Limits(max_per_key=2), Limits(), flow.KEY_WALK),
        (Limits.declare(rate_limit="2/min", rate_burst=2), Limits(), flow.KEY_WALK),
        (Limits(), Limits(fair=True), 2),
    ],
    ids=["max_concurrency", "max_per_key", "rate_limit", "key_walk"],
)
async def test_a_limited_claim_cut_short_by_a_bound_says_it_held_jobs_back(
    queue: Queue,
    monkeypatch: pytest.MonkeyPatch,
    kind_limits: Limits,
    queue_limits: Limits,
    key_walk: int,
) -> None:
    monkeypatch.setattr(flow, "KEY_WALK", key_walk)
    await queue.declare_limits("w", {"a": kind_limits}, {"default": queue_limits})
    await queue.enqueue_many([NewJob(kind="a", concurrency_key=f"k{i % 3}") for i in range(9)])
    got, held = await _held(queue, 10)
    assert got < 9 and held


async def test_a_claim_without_the_key_walk_holds_back_a_queue_keyed_since(queue: Queue) -> None:
    await queue.declare_limits("w", {"a": Limits(max_concurrency=5)}, {})
    await queue.enqueue_many([NewJob(kind="a", concurrency_key="k") for _ in range(3)])
    first = await queue.claim_limited_held("w", KINDS, QUEUES, 1, lease_seconds=30)
    assert len(first.jobs) == 1 and not first.keyed  # the next claim may skip the walk
    await queue.declare_limits("w", {"a": Limits(max_per_key=2)}, {})
    skipped = await queue.claim_limited_held(
        "w", KINDS, QUEUES, 5, lease_seconds=30, walk_keys=False
    )
    assert (skipped.jobs, skipped.held_back, skipped.keyed) == ([], True, True)
    walked = await queue.claim_limited_held("w", KINDS, QUEUES, 5, lease_seconds=30)
    assert len(walked.jobs) == 1  # 2 per key, 1 already running


def _claimer_waits(
    held_back: list[bool], *, all_limited: bool = False
) -> tuple[list[tuple[str, float]], int]:
    """What an idle limited worker's claim loop waits for after each short claim, the limited
    claim answering `held_back` in turn; and how many plain claims it made."""
    from jobq.queue.flow import LimitedClaim
    from jobq.settings import Settings
    from jobq.worker.claimer import Claimer
    from jobq.worker.state import WorkerState

    state = WorkerState("w", Settings(poll_interval_seconds=3.0), kinds=["a"], queues=["default"],
                        concurrency=4)  # fmt: skip
    answers = list(held_back)
    waits: list[tuple[str, float]] = []
    plain: list[int] = []

    class FakeQueue:
        async def limits_cover(self, kinds: object, queues: object) -> tuple[bool, bool]:
            return True, all_limited

        async def claim(self, *args: object, **kwargs: object) -> list[object]:
            plain.append(1)
            return []

        async def claim_limited_held(self, *args: object, **kwargs: object) -> LimitedClaim:
            return LimitedClaim([], held_back=answers.pop(0))

    async def wait_any(event: asyncio.Event, timeout: float) -> None:
        name = {id(state.slot_freed): "slot_freed", id(state.outcome_written): "outcome_written"}
        waits.append((name.get(id(event), "wake"), timeout))
        if not answers:
            state.stopping.set()

    state.wait_any = wait_any  # type: ignore[method-assign]
    claimer = Claimer(state, FakeQueue(), None, batch_size=10, max_attempts={})  # type: ignore[arg-type]
    asyncio.run(claimer.loop())
    return waits, len(plain)


def test_an_idle_limited_worker_waits_for_a_notify_or_the_poll_not_a_fast_retry() -> None:
    assert _claimer_waits([False, False])[0] == [("wake", 3.0), ("wake", 3.0)]


def test_a_limited_worker_held_back_by_a_bound_tries_again_soon_or_once_an_outcome_is_written() -> (
    None
):
    # Not as soon as a run ends: its success holds its slot until it is written.
    from jobq.worker.claimer import LIMITED_RETRY_SECONDS

    assert _claimer_waits([True, False])[0] == [
        ("outcome_written", LIMITED_RETRY_SECONDS),
        ("wake", 3.0),
    ]


def test_a_worker_whose_kinds_are_all_limited_makes_no_plain_claim() -> None:
    assert _claimer_waits([False, False], all_limited=True)[1] == 0
    assert _claimer_waits([False, False], all_limited=False)[1] == 2


async def test_limits_cover_says_when_every_kind_or_every_queue_is_limited(queue: Queue) -> None:
    await queue.declare_limits("w", {"a": Limits(max_concurrency=1)}, {})
    assert await queue.limits_cover(KINDS, QUEUES) == (True, False)
    await queue.declare_limits("w", {"b": Limits(max_concurrency=1)}, {})
    assert await queue.limits_cover(KINDS, QUEUES) == (True, True)
    await queue.declare_limits("w", {"a": Limits(), "b": Limits()}, {"default": Limits(fair=True)})
    assert await queue.limits_cover(KINDS, ["default"]) == (True, True)
    assert await queue.limits_cover(KINDS, QUEUES) == (True, False)


# -- per-key rate limits ---------------------------------------------------------------------


def test_per_key_rate_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="rate_limit_per_key"):
        Limits.declare(rate_limit_per_key="often")
    with pytest.raises(ValueError, match="rate_burst_per_key"):
        Limits.declare(rate_burst_per_key=3)
    limits = Limits.declare(rate_limit_per_key="120/min")
    assert (limits.rate_per_key, limits.burst_per_key, limits.any) == (2.0, 2.0, True)


@pytest.mark.parametrize(
    "limits",
    [Limits(max_per_key=1), Limits.declare(rate_limit_per_key="1/min", rate_burst_per_key=1)],
    ids=["max_per_key", "rate_limit_per_key"],
)
async def test_a_backlog_without_a_key_in_front_does_not_hold_back_keyed_jobs(
    queue: Queue, limits: Limits
) -> None:
    # The "no key" key starts one; the claim's other places go to the keyed jobs behind.
    await queue.declare_limits("w", {"a": limits}, {})
    await queue.enqueue_many([NewJob(kind="a") for _ in range(20)])
    await queue.enqueue_many([NewJob(kind="a", concurrency_key=f"t{i:02}") for i in range(20)])
    first = await _claim(queue, 10, limited=True)
    assert (len(first), sum(j.concurrency_key is None for j in first)) == (10, 1)
    second = await _claim(queue, 10, limited=True)
    assert (len(second), sum(j.concurrency_key is None for j in second)) == (10, 0)


async def test_jobs_without_a_key_share_one_bucket_under_a_per_key_rate(queue: Queue) -> None:
    # As they share one key's bound under max_per_key: a producer that forgets the key field
    # must not start its jobs without limit.
    limits = Limits.declare(rate_limit_per_key="2/min", rate_burst_per_key=2)
    await queue.declare_limits("w", {"a": limits}, {})
    await queue.enqueue_many([NewJob(kind="a") for _ in range(5)])
    first = await queue.claim_limited_held("w", KINDS, QUEUES, 20, lease_seconds=30)
    assert (len(first.jobs), first.held_back) == (2, True)
    assert await _claim(queue, 20, limited=True) == []
    await queue.pool.execute(
        "UPDATE jobq_flow_key_buckets SET refilled_at = refilled_at - interval '30 s'"
    )
    assert len(await _claim(queue, 20, limited=True)) == 1


async def test_each_concurrency_key_has_its_own_rate_bucket(queue: Queue) -> None:
    # 2 a minute: no token comes back while the test runs unless the test moves the clock.
    limits = Limits.declare(rate_limit_per_key="2/min", rate_burst_per_key=2)
    await queue.declare_limits("w", {"a": limits}, {})
    await queue.enqueue_many(
        [NewJob(kind="a", concurrency_key=k) for k in "AB" for _ in range(5)]
        + [NewJob(kind="a"), NewJob(kind="a")]
    )
    first = await queue.claim_limited_held("w", KINDS, QUEUES, 20, lease_seconds=30)
    keys = sorted(str(j.concurrency_key) for j in first.jobs)
    assert keys == ["A", "A", "B", "B", "None", "None"] and first.held_back
    assert await _claim(queue, 20, limited=True) == []
    # 30 s later for A only: one token more, for A.
    await queue.pool.execute(
        "UPDATE jobq_flow_key_buckets SET refilled_at = refilled_at - interval '30 s'"
        " WHERE key = 'A'"
    )
    assert [j.concurrency_key for j in await _claim(queue, 20, limited=True)] == ["A"]
    attempts = await queue.pool.fetchval("SELECT sum(attempts) FROM jobs WHERE status = 'queued'")
    assert attempts == 0  # those waiting for a token spent no attempt


async def test_the_cleaner_removes_refilled_key_buckets_and_keeps_the_others(queue: Queue) -> None:
    # Claims remove refilled buckets only of keys they hold: a key with no job left is walked
    # by no claim, and its bucket must not stay forever.
    await queue.declare_limits("w", {"a": Limits.declare(rate_limit_per_key="1/min")}, {})
    await queue.enqueue_many([NewJob(kind="a", concurrency_key=k) for k in "AB"])
    assert len(await _claim(queue, 10, limited=True)) == 2
    await queue.pool.execute(
        "UPDATE jobq_flow_key_buckets SET refilled_at = refilled_at - interval '2 min'"
        " WHERE key = 'A'"
    )
    assert await queue.prune_key_buckets() == 1
    keys = await queue.pool.fetch("SELECT key FROM jobq_flow_key_buckets")
    assert [r["key"] for r in keys] == ["B"]


async def test_a_worker_starts_each_key_s_jobs_within_its_bucket(queue: Queue, dsn: str) -> None:
    import time

    from jobq import JobContext, Registry
    from tests.test_worker import running

    rate, burst = 10.0, 3
    registry = Registry()
    starts: dict[str, list[float]] = {"A": [], "B": []}

    @registry.handler("metered", concurrency_key="tenant", rate_limit_per_key="10/s",
                      rate_burst_per_key=burst)  # fmt: skip
    async def metered(ctx: JobContext, payload: dict[str, str]) -> None:
        starts[payload["tenant"]].append(time.time())

    await queue.enqueue_many(
        [registry.new_job("metered", {"tenant": k}) for k in "AB" for _ in range(10)]
    )
    begun = time.time()
    async with running(dsn, registry):
        await wait_for(lambda: _at_least(starts, 6), timeout=15)
    for key, times in starts.items():
        # The i-th start of a key: its bucket's burst, plus what it refilled since, at most.
        for i, t in enumerate(sorted(times), start=1):
            assert i <= burst + rate * (t - begun), (key, i, t - begun)
    # Each key past one bucket's worth: one key's starts do not spend the other's tokens.
    assert all(len(times) > burst for times in starts.values())


async def _at_least(starts: dict[str, list[float]], n: int) -> bool:
    return all(len(times) >= n for times in starts.values())


# -- weighted fair share ---------------------------------------------------------------------


def test_fair_weights_are_checked() -> None:
    with pytest.raises(ValueError, match="fair=True"):
        Limits.declare(fair_weights={"gold": 3})
    with pytest.raises(ValueError, match="weight of 'gold'"):
        Limits.declare(fair=True, fair_weights={"gold": 0})
    with pytest.raises(ValueError, match="a key"):
        Limits.declare(fair=True, fair_weights={"": 2})
    assert Limits.declare(fair=True, fair_weights={"b": 2, "a": 3}).fair_weights == (
        ("a", 3),
        ("b", 2),
    )


async def test_a_key_with_weight_w_gets_w_turns_per_round(queue: Queue) -> None:
    limits = Limits.declare(fair=True, fair_weights={"gold": 3})
    await queue.declare_limits("w", {}, {"default": limits})
    await queue.enqueue_many(
        [
            NewJob(kind="a", concurrency_key=k)
            for _ in range(10)
            for k in ("bronze", "gold", "silver")
        ]
    )
    rounds = []
    for _ in range(2):
        claimed = await _claim(queue, 5, limited=True)
        rounds.append(sorted(str(j.concurrency_key) for j in claimed))
    assert rounds == [["bronze", "gold", "gold", "gold", "silver"]] * 2
