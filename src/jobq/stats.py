"""The operator's overview, as `GET /stats`, the dashboard and `jobq status` show it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from jobq.queue import STATUSES, Queue

WINDOW_MINUTES = 15
FAILING_KINDS_LIMIT = 5


async def collect(queue: Queue, *, minutes: int = WINDOW_MINUTES) -> dict[str, Any]:
    """Everything the overview shows, as JSON-ready data (`StatsOut`). One query per part."""
    counts, lags, per_minute, failing, unhandled, workers = await asyncio.gather(
        queue.counts(),
        queue.oldest_due(),
        queue.finished_per_minute(minutes),
        queue.failing_kinds(minutes, FAILING_KINDS_LIMIT),
        queue.unhandled(),
        queue.workers(),
    )
    by_queue: dict[str, dict[str, int]] = {}
    for name, status, n in counts:
        by_queue.setdefault(name, dict.fromkeys(STATUSES, 0))[status] = n
    lag_by_queue = {lag.queue: lag for lag in lags}
    for name in lag_by_queue:
        by_queue.setdefault(name, dict.fromkeys(STATUSES, 0))
    queues = []
    for name in sorted(by_queue):
        lag = lag_by_queue.get(name)
        queues.append(
            {
                "queue": name,
                "counts": by_queue[name],
                "total": sum(by_queue[name].values()),
                "oldest_due_at": lag.oldest_run_at if lag else None,
                "oldest_due_age_seconds": round(lag.age_seconds, 3) if lag else None,
            }
        )
    return {
        "generated_at": datetime.now(UTC),
        "window_minutes": minutes,
        "queues": queues,
        "finished_per_minute": [
            {
                "minute": m.minute,
                "succeeded": m.succeeded,
                "failed_permanent": m.failed,
                "cancelled": m.cancelled,
            }
            for m in per_minute
        ],
        "failing_kinds": [
            {
                "kind": f.kind,
                "failed_permanent": f.failed,
                "retrying": f.retrying,
                "last_error": f.last_error,
                "last_job_id": str(f.last_job_id),
                "last_failed_at": f.last_failed_at,
            }
            for f in failing
        ],
        "unhandled": [
            {
                "queue": u.queue,
                "kind": u.kind,
                "count": u.count,
                "oldest_created_at": u.oldest_created_at,
            }
            for u in unhandled
        ],
        "workers": [
            {
                "worker_id": w.worker_id,
                "kinds": w.kinds,
                "queues": w.queues,
                "concurrency": w.concurrency,
                "started_at": w.started_at,
                "last_seen_at": w.last_seen_at,
            }
            for w in workers
        ],
    }
