"""The worker runtime: claims jobs, runs handlers, keeps leases alive, observes cancellation.

One process runs one `Worker` (`runtime`), which is a handful of asyncio tasks, one module each:

- `claimer`: the claim loop, up to `concurrency` jobs in flight.
- `execution`: one task per job, running its handler and recording the outcome.
- `threads`: the daemon threads sync (`def`) handlers run in.
- `completions`: the completion writer, successes written in batches.
- `heartbeat`: lease extension, cancel news, lost leases, presence.
- `listener`: the LISTEN connection, its self-check and the poll-only fallback.
- `maintenance`: each service of `jobq.maintenance` (the rescuer, ...) in a loop of its own.

`state` holds what they share. Every write is fenced by the job's lease token (see
`jobq.queue`), so nothing this worker does late can overwrite what another worker or an
operator decided meanwhile.
"""

from jobq.worker.claimer import MAX_CLAIM_BATCH
from jobq.worker.completions import MAX_COMPLETION_BATCH
from jobq.worker.listener import (
    LISTEN_CHECK_CHANNEL,
    LISTEN_CHECK_SECONDS,
    LISTEN_RECHECK_SECONDS,
)
from jobq.worker.maintenance import run_service
from jobq.worker.runtime import Worker, default_pool_size, default_worker_id

# After the grace period, how long the worker keeps trying to write what it owes the database
# (releases, outcomes) before it gives up and exits; a second signal gives up at once. Read
# from here at each shutdown, so that it can be changed at run time.
SHUTDOWN_WRITE_SECONDS = 5.0

__all__ = [
    "LISTEN_CHECK_CHANNEL",
    "LISTEN_CHECK_SECONDS",
    "LISTEN_RECHECK_SECONDS",
    "MAX_CLAIM_BATCH",
    "MAX_COMPLETION_BATCH",
    "SHUTDOWN_WRITE_SECONDS",
    "Worker",
    "default_pool_size",
    "default_worker_id",
    "run_service",
]
