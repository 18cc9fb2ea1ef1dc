"""Decorrelated jitter: delay_n = min(cap, uniform(base, 3 * delay_{n-1})), delay_0 = base."""

from __future__ import annotations

import random

import pytest

from jobq.backoff import Backoff
from jobq.registry import Registry
from jobq.settings import Settings
from jobq.worker import Worker


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
    with pytest.raises(ValueError, match="cap"):
        Backoff(10, 5)


# -- overrides: a handler's bounds, the rest from settings -------------------------------

CONFIGURED = Backoff(1, 60)


def _handler_backoff(**overrides: float) -> Backoff:
    registry = Registry()
    registry.handler("k", **overrides)(lambda ctx, payload: None)  # type: ignore[arg-type]
    return registry["k"].backoff_with(CONFIGURED)


@pytest.mark.parametrize("base", [0, -1])
def test_a_base_of_zero_or_less_is_rejected(base: float) -> None:
    with pytest.raises(ValueError, match="base"):
        Backoff(base, 5)


@pytest.mark.parametrize("overrides", [{"retry_base_seconds": 0}, {"retry_cap_seconds": 0}])
def test_a_handler_bound_of_zero_is_rejected_not_taken_as_unset(
    overrides: dict[str, float],
) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        _handler_backoff(**overrides)


def test_a_handler_cap_below_its_base_is_rejected_at_registration() -> None:
    with pytest.raises(ValueError, match="cap"):
        _handler_backoff(retry_base_seconds=10, retry_cap_seconds=5)


def test_overriding_only_the_base_keeps_the_configured_cap() -> None:
    assert _handler_backoff(retry_base_seconds=2) == Backoff(2, 60)


def test_overriding_only_the_cap_keeps_the_configured_base() -> None:
    assert _handler_backoff(retry_cap_seconds=10) == Backoff(1, 10)


def test_a_handler_without_overrides_uses_the_configured_bounds() -> None:
    assert _handler_backoff() == CONFIGURED


def test_an_override_that_leaves_the_cap_below_the_configured_base_fails_at_worker_start() -> None:
    registry = Registry()
    registry.handler("tight", retry_cap_seconds=0.5)(lambda ctx, payload: None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tight"):
        Worker("postgresql://unused", registry, settings=Settings(retry_base_seconds=1))
