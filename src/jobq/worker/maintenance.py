"""The maintenance runner: each service of `jobq.maintenance` in a loop of its own.

The rescuer (jobs of dead workers back to the queue) and the other periodic passes run in
every worker; each pass is safe against the same pass in other workers, so none is elected.
"""

from __future__ import annotations

import asyncio
import logging
import random

from jobq import db
from jobq.maintenance import Service

log = logging.getLogger("jobq.worker")


async def run_service(service: Service) -> None:
    """Run one maintenance service until cancelled: a first pass after a jittered delay
    (workers started together do not all run it at once), then one every `interval`, +-10 %.
    A failed pass is logged and the next one comes on time."""
    await asyncio.sleep(service.interval * random.uniform(0.0, 0.1))
    while True:
        try:
            await service.run_once()
        except Exception as exc:
            # An outage is logged by the loops that wait it out; a pass just comes later.
            if not db.is_unavailable(exc):
                log.exception("%s failed", service.name, extra={"service": service.name})
        await asyncio.sleep(service.interval * random.uniform(0.9, 1.1))


def start(services: list[Service]) -> list[asyncio.Task[None]]:
    """One task per service; cancelling them stops the services cleanly."""
    return [asyncio.create_task(run_service(s), name=f"jobq-{s.name}") for s in services]
