"""The rescuer: returns the jobs of dead workers to the queue.

A running job whose lease expired has lost its worker (crashed, killed, cut off from the
database): the rescuer retries it after its backoff, or ends it when its attempts are spent.
`Queue.rescue` fences on the lease, so a pass racing a late heartbeat rescues nothing alive.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from jobq import metrics
from jobq.backoff import Backoff
from jobq.queue import Queue
from jobq.settings import Settings

# The worker's logger: rescues are what operators look for in a worker's log.
log = logging.getLogger("jobq.worker")


class Rescuer:
    name = "rescue"

    def __init__(
        self, queue: Queue, settings: Settings, *, backoffs: Mapping[str, Backoff] | None = None
    ) -> None:
        self.queue = queue
        self.interval = settings.rescue_interval_seconds
        # A rescued job waits its own handler's backoff, not the default one.
        self.backoffs = dict(backoffs or {})

    async def run_once(self) -> None:
        for rescued in await self.queue.rescue(backoffs=self.backoffs):
            metrics.JOBS_FINISHED.labels(rescued.kind, "rescued").inc()
            log.warning(
                "rescued a job from a lost worker",
                extra={"job_id": str(rescued.job_id), "kind": rescued.kind,
                       "status": rescued.status},
            )  # fmt: skip
