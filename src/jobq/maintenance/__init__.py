"""Maintenance services: the periodic passes a worker runs besides its jobs.

Each service is one pass over the database (`run_once`) that any number of workers may run at
once: every pass is idempotent and safe against the others, so no leader is elected. The worker
runs each in a loop of its own (see `jobq.worker.maintenance`), every `interval` seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from jobq.backoff import Backoff
from jobq.maintenance.cleaner import Cleaner
from jobq.maintenance.partitioner import Partitioner
from jobq.maintenance.rescuer import Rescuer
from jobq.maintenance.rollups import RollupCompactor
from jobq.maintenance.scheduler import Scheduler
from jobq.periodic import Schedule
from jobq.queue import Queue
from jobq.settings import Settings


class Service(Protocol):
    name: str
    interval: float  # seconds between passes

    async def run_once(self) -> None: ...


def services(
    queue: Queue,
    settings: Settings,
    *,
    backoffs: Mapping[str, Backoff] | None = None,
    schedules: Sequence[Schedule] = (),
) -> list[Service]:
    """Every service a worker runs. `backoffs`: the worker's handlers', by kind; `schedules`:
    its registry's periodic schedules (the scheduler runs only when there are some)."""
    found: list[Service] = [
        Rescuer(queue, settings, backoffs=backoffs),
        RollupCompactor(queue.pool),
        Partitioner(queue, settings),
        Cleaner(queue, settings),
    ]
    if schedules:
        found.append(Scheduler(queue, schedules))
    return found


__all__ = [
    "Cleaner",
    "Partitioner",
    "Rescuer",
    "RollupCompactor",
    "Scheduler",
    "Service",
    "services",
]
