"""The partitioner: keeps history leaves ahead of the clock.

A job that ends lands in the leaf of its class that holds its finish time; with no such leaf
its completion fails and must create one first. So every worker runs this pass: the leaves
from now to two widths ahead exist for both classes, created by
`jobq_history_ensure_partition` (no lock that stops completions or readers). One worker at a
time does it (a transaction-scoped try-lock; the others skip the pass), often enough that even
1-minute leaves are always there ahead. Empty leaves wider than the width (made before it
was narrowed: a fresh install's day-wide leaves, then a retention of minutes) are replaced.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from jobq.queue import Queue, history
from jobq.settings import Settings

log = logging.getLogger("jobq.worker")


def partitioner_interval(width: timedelta) -> float:
    """Seconds between passes for the narrowest leaf `width`: a quarter of it, so that a few
    failed passes still leave a leaf ahead, between 5 s and 5 minutes."""
    return min(max(width.total_seconds() / 4, 5.0), 300.0)


class Partitioner:
    name = "partitioner"

    def __init__(self, queue: Queue, settings: Settings) -> None:
        self.pool = queue.pool
        self.widths = {"done": settings.leaf_width_done, "failed": settings.leaf_width_failed}
        self.interval = partitioner_interval(min(self.widths.values()))

    async def create_ahead(self) -> list[str]:
        """Create the missing leaves ahead; their names (none when another worker holds the
        pass)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtext($1))", history.PARTITIONER_LOCK
            ):
                return []
            replaced = await history.replace_wide_empty(conn, self.widths)
            made = await history.ensure_ahead(conn, self.widths)
        if replaced:
            log.info("replaced %d empty history leaves wider than the leaf width", len(replaced),
                     extra={"service": self.name, "leaves": ",".join(replaced)})  # fmt: skip
        if made:
            log.info("created %d history leaves ahead", len(made),
                     extra={"service": self.name, "leaves": ",".join(made)})  # fmt: skip
        return made

    async def run_once(self) -> None:
        await self.create_ahead()
