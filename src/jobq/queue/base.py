"""What every part of the queue core shares: the pool and the defaults a `Queue` was made with."""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from jobq.backoff import Backoff
from jobq.middleware import Middleware

# A connection of one's own or one borrowed from a pool.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class QueueBase:
    pool: asyncpg.Pool
    # For a job claimed with no max_attempts of its own and none from its handler.
    default_max_attempts: int
    default_backoff: Backoff
    # The width of a history leaf a completion creates when its finish time has none.
    history_leaf_width: timedelta
    # How long after its job's creation an idempotency key is remembered at least.
    idempotency_window: timedelta
    # The largest result stored, as JSON text in UTF-8 (JOBQ_MAX_PAYLOAD_BYTES).
    max_result_bytes: int
    # Around every enqueue, inside the process-wide middleware (`jobq.middleware`).
    middleware: tuple[Middleware, ...]
