"""Decorrelated jitter: delay_n = min(cap, uniform(base, 3 * delay_{n-1})), delay_0 = base."""

from __future__ import annotations

import random

import pytest

from jobq.backoff import Backoff


def test_first_retry_delay_is_between_base_and_three_times_base() -> None:
    rng = random.Random(1)
    delays = [Backoff(1, 60).next_delay(None, rng) for _ in range(1000)]
    assert all(1 <= d <= 3 for d in delays)


def test_each_delay_is_drawn_from_the_previous_one() -> None:
    rng = random.Random(2)
    backoff = Backoff(0.5, 1000)
    previous = None
    for _ in range(20):
        delay = backoff.next_delay(previous, rng)
        upper = 3 * (previous if previous is not None else 0.5)
        assert 0.5 <= delay <= upper
        previous = delay


def test_delays_never_exceed_the_cap() -> None:
    rng = random.Random(3)
    backoff = Backoff(1, 10)
    previous = None
    for _ in range(200):
        previous = backoff.next_delay(previous, rng)
        assert 1 <= previous <= 10


def test_sequence_is_reproducible_with_a_seeded_rng() -> None:
    def run(seed: int) -> list[float]:
        rng, prev, out = random.Random(seed), None, []
        for _ in range(10):
            prev = Backoff(1, 60).next_delay(prev, rng)
            out.append(prev)
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_sequence_is_decorrelated_not_a_fixed_schedule() -> None:
    rng = random.Random(4)
    seconds = {round(Backoff(1, 60).next_delay(3.0, rng), 6) for _ in range(50)}
    assert len(seconds) > 40


def test_base_above_cap_is_rejected() -> None:
    with pytest.raises(ValueError):
        Backoff(10, 5)
