"""`Queue`: the queue core's one entry point, composed of one part per concern."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta

import asyncpg

from jobq.backoff import Backoff
from jobq.middleware import Middleware, as_middleware
from jobq.queue.enqueue import Enqueue, WakeUps
from jobq.queue.flow import Flow
from jobq.queue.leases import Leases
from jobq.queue.lookup import Lookup
from jobq.queue.operator import Operator
from jobq.queue.presence import Presence
from jobq.queue.progress import Progress
from jobq.queue.schedules import Schedules
from jobq.queue.unique import UniqueSpec
from jobq.queue.views import Views
from jobq.queue.waits import Waits, Watcher


class Queue(Enqueue, Operator, Lookup, Leases, Flow, Progress, Waits, Views, Presence, Schedules):
    """Queue operations over an asyncpg pool. Safe to share between tasks."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        default_max_attempts: int = 3,
        default_backoff: Backoff | None = None,
        notify_window: float = 0.002,
        history_leaf_width: timedelta = timedelta(days=1),
        idempotency_window: timedelta = timedelta(hours=24),
        max_result_bytes: int = 1024 * 1024,
        middleware: Sequence[Middleware] = (),
        listen_dsn: str | None = None,
        pooler: str = "none",
        unique: Mapping[str, UniqueSpec] | None = None,
    ) -> None:
        """`listen_dsn`: where `wait` listens (a connection opened when someone waits); None
        borrows one from the pool while anyone waits. `pooler`: how `listen_dsn` is reached.
        `unique`: kinds every `enqueue` of which is a unique job unless it says otherwise
        (`Registry.unique_defaults`); batches refuse them."""
        self.pool = pool
        self.default_max_attempts = default_max_attempts
        self.default_backoff = default_backoff or Backoff()
        self.history_leaf_width = history_leaf_width
        self.idempotency_window = idempotency_window
        self.max_result_bytes = max_result_bytes
        self.middleware = tuple(as_middleware(m) for m in middleware)
        self.unique_defaults = dict(unique or {})
        self._wake_ups = WakeUps(pool, notify_window)
        self.listen_dsn = listen_dsn
        self.pooler = pooler
        self._watcher = Watcher(self, listen_dsn, pooler)
