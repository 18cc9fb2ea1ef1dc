"""What every part of the queue core shares: the pool and the defaults a `Queue` was made with."""

from __future__ import annotations

import asyncpg

from jobq.backoff import Backoff

# A connection of one's own or one borrowed from a pool.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class QueueBase:
    pool: asyncpg.Pool
    # For a job claimed with no max_attempts of its own and none from its handler.
    default_max_attempts: int
    default_backoff: Backoff
