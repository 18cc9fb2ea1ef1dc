"""The cleaner: applies retention to history and expires idempotency keys.

Every 30 s (jittered by the service loop) one worker at a time, under the retention lock
(`jobq.queue.history.Retention`; the others skip the pass), removes each history leaf whose
whole time range is older than its class's retention (`JOBQ_RETENTION` for succeeded and
cancelled, `JOBQ_RETENTION_FAILED` for failed_permanent), finishes what a pass that died left
half done, and deletes idempotency keys past `JOBQ_IDEMPOTENCY_WINDOW` whose job is gone.
Every worker also deletes unique-job keys whose period has passed and per-key rate buckets
that have refilled (any number may at once).
History is thus kept between retention and retention plus one leaf width; rows inside a leaf
that stays are removed only by `jobq prune` with an explicit horizon.
"""

from __future__ import annotations

import logging

from jobq.queue import Queue, history
from jobq.settings import Settings

log = logging.getLogger("jobq.worker")

CLEANER_INTERVAL_SECONDS = 30.0


def describe(report: history.Report) -> str:
    """One line: what a pass removed (or would remove)."""
    verb = "would remove" if report.dry_run else "removed"
    parts = [f"{len(report.leaves)} history leaf(s)"]
    if report.deleted:
        parts.append(f"{sum(d.rows for d in report.deleted):,} row(s) from leaves kept")
    parts.append(f"{report.keys:,} expired idempotency key(s)")
    return (
        f"retention {verb} {', '.join(parts)}: {report.rows:,} row(s), {report.bytes / 1e6:,.1f} MB"
    )


class Cleaner:
    name = "cleaner"
    interval = CLEANER_INTERVAL_SECONDS

    def __init__(self, queue: Queue, settings: Settings) -> None:
        self.queue = queue
        self.retention = history.Retention(queue.pool)
        self.keep = {"done": settings.retention, "failed": settings.retention_failed}
        # Where this process's scan for expired keys stands: each pass goes on from there.
        self.keys = history.KeyCursor()

    async def clean(self) -> history.Report | None:
        """One pass; None when another worker holds the retention lock."""
        now = await self.retention.now()
        targets = history.retention_targets(now, self.keep)
        report = await self.retention.run(targets, keys=self.keys)
        if report is not None and report.removed_anything:
            log.info(
                describe(report),
                extra={
                    "service": self.name,
                    "leaves": ",".join(r.leaf.name for r in report.leaves),
                    "rows": report.rows,
                    "bytes": report.bytes,
                    "keys": report.keys,
                },
            )
        return report

    async def run_once(self) -> None:
        await self.clean()
        await self.queue.expire_unique_keys()
        await self.queue.prune_key_buckets()
