"""Worker presence: which workers are alive and what they take."""

from __future__ import annotations

from collections.abc import Sequence

from jobq.queue.base import QueueBase
from jobq.queue.model import WorkerInfo

_LIVE_WORKERS = """
SELECT worker_id, kinds, queues, concurrency, started_at, last_seen_at
FROM jobq_workers WHERE expires_at > now() ORDER BY started_at, worker_id
"""

# A worker announces itself (and clears rows of workers long gone).
_WORKER_SEEN = """
WITH gone AS (
    DELETE FROM jobq_workers WHERE expires_at < now() - interval '1 hour'
)
INSERT INTO jobq_workers (worker_id, kinds, queues, concurrency, expires_at)
VALUES ($1, $2::text[], $3::text[], $4, now() + make_interval(secs => $5))
ON CONFLICT (worker_id) DO UPDATE
SET kinds = excluded.kinds, queues = excluded.queues, concurrency = excluded.concurrency,
    last_seen_at = now(), expires_at = excluded.expires_at
"""


class Presence(QueueBase):
    async def workers(self) -> list[WorkerInfo]:
        """Workers that announced themselves and have not expired."""
        rows = await self.pool.fetch(_LIVE_WORKERS)
        return [
            WorkerInfo(
                r["worker_id"],
                list(r["kinds"]),
                list(r["queues"]),
                r["concurrency"],
                r["started_at"],
                r["last_seen_at"],
            )
            for r in rows
        ]

    async def worker_seen(
        self,
        worker_id: str,
        kinds: Sequence[str],
        queues: Sequence[str],
        concurrency: int,
        *,
        ttl_seconds: float,
    ) -> None:
        """A worker is alive and takes these kinds and queues, for the next `ttl_seconds`."""
        await self.pool.execute(
            _WORKER_SEEN, worker_id, list(kinds), list(queues), concurrency, float(ttl_seconds)
        )

    async def worker_gone(self, worker_id: str) -> None:
        await self.pool.execute("DELETE FROM jobq_workers WHERE worker_id = $1", worker_id)
