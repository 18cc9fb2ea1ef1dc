"""Hypothesis properties: retry backoff bounds, and cursor paging under concurrent inserts."""

from __future__ import annotations

import asyncio
import random

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobq.backoff import Backoff
from jobq.queue import NewJob, Queue
from tests.helpers import ALL_JOBS, NO_JOBS

seconds = st.floats(min_value=0, max_value=3600, allow_nan=False, allow_infinity=False)


@st.composite
def backoffs(draw: st.DrawFn) -> Backoff:
    base = draw(st.floats(min_value=0.001, max_value=3600, allow_nan=False))
    cap = draw(st.floats(min_value=base, max_value=7200, allow_nan=False))
    return Backoff(base, cap)


@given(backoffs(), st.none() | seconds, st.integers(0, 2**32))
def test_every_delay_lies_between_base_and_cap(
    backoff: Backoff, previous: float | None, seed: int
) -> None:
    delay = backoff.next_delay(previous, random.Random(seed))
    assert backoff.base <= delay <= backoff.cap


@given(backoffs(), st.none() | seconds, st.integers(0, 2**32))
def test_a_delay_is_at_most_three_times_the_previous_one(
    backoff: Backoff, previous: float | None, seed: int
) -> None:
    delay = backoff.next_delay(previous, random.Random(seed))
    prev = backoff.base if previous is None else previous
    assert delay <= max(backoff.base, 3 * prev)


@given(backoffs(), st.integers(1, 60), st.integers(0, 2**32))
def test_a_whole_retry_sequence_stays_under_the_cap(backoff: Backoff, n: int, seed: int) -> None:
    rng, previous = random.Random(seed), None
    for _ in range(n):
        previous = backoff.next_delay(previous, rng)
        assert backoff.base <= previous <= backoff.cap


@given(backoffs(), seconds, st.none() | seconds, st.integers(0, 2**32))
def test_raising_the_cap_never_shortens_a_delay(
    backoff: Backoff, extra: float, previous: float | None, seed: int
) -> None:
    higher = Backoff(backoff.base, backoff.cap + extra)
    low = backoff.next_delay(previous, random.Random(seed))
    high = higher.next_delay(previous, random.Random(seed))
    assert low <= high


# -- paging -------------------------------------------------------------------------------


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    initial=st.integers(0, 60),
    limit=st.integers(1, 15),
    inserts=st.lists(st.integers(0, 6), max_size=12),
)
async def test_cursor_pages_partition_the_jobs_with_no_duplicates_or_gaps_under_inserts(
    pool: asyncpg.Pool, initial: int, limit: int, inserts: list[int]
) -> None:
    await pool.execute(NO_JOBS)
    queue = Queue(pool)
    await queue.enqueue_many([NewJob(kind="page", payload={"i": i}) for i in range(initial)])
    existing = {r["id"] for r in await pool.fetch(f"SELECT id FROM {ALL_JOBS}")}

    seen: list[tuple[object, object]] = []
    cursor: str | None = None
    step = 0
    while True:
        # Newer jobs arrive while the pages are read: some before, some during the read.
        n = inserts[step] if step < len(inserts) else 0
        newer = queue.enqueue_many([NewJob(kind="page", queue="newer") for _ in range(n)])
        page, _ = await asyncio.gather(queue.list_jobs(limit=limit, cursor=cursor), newer)
        assert len(page.jobs) <= limit
        seen += [(j.created_at, j.id) for j in page.jobs]
        step += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor

    ids = [job_id for _, job_id in seen]
    assert len(ids) == len(set(ids)), "a job appeared on two pages"
    assert existing <= set(ids), "a job that existed before paging began was skipped"
    assert seen == sorted(seen, reverse=True), "pages are not newest first"
