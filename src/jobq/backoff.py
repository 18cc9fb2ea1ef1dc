"""Retry delays: decorrelated jitter.

    delay_0 = base
    delay_n = min(cap, uniform(base, delay_{n-1} * 3))

Each delay is drawn from the previous one, so the sequence grows on average but concurrent
failures spread out instead of retrying in lock-step. The previous delay is stored per job.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    base: float = 1.0
    cap: float = 60.0

    def __post_init__(self) -> None:
        # A base of 0 would make every delay 0: each draw is bounded by 3 x the previous one.
        if not self.base > 0:
            raise ValueError(f"backoff base must be > 0, got {self.base}")
        if self.cap < self.base:
            raise ValueError(f"backoff cap ({self.cap}) must be >= its base ({self.base})")

    def next_delay(self, previous: float | None, rng: random.Random | None = None) -> float:
        """The delay before the next retry, given the previous delay (None before the first)."""
        prev = self.base if previous is None else previous
        upper = max(self.base, prev * 3)
        draw = (rng or _rng).uniform(self.base, upper)
        return min(self.cap, draw)


_rng = random.Random()
