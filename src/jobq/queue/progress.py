"""Progress a running handler reports (ctx.progress): written fenced by the lease, in batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from jobq.queue.base import QueueBase
from jobq.queue.model import Lease, notify_watchers
from jobq.queue.validation import is_utf8

MAX_PROGRESS_MESSAGE = 1000


@dataclass(frozen=True, slots=True)
class ProgressReport:
    lease: Lease
    fraction: float
    message: str | None


def check_progress(fraction: object, message: object) -> tuple[float, str | None]:
    """The report as stored, or ValueError: a fraction in [0, 1] (not NaN, not a bool), a
    message of at most MAX_PROGRESS_MESSAGE characters without NUL, or None."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ValueError(f"progress must be a number from 0 to 1, got {type(fraction).__name__}")
    value = float(fraction)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"progress must be a number from 0 to 1, got {fraction!r}")
    if message is not None:
        if not isinstance(message, str):
            raise ValueError(f"a progress message must be a string, got {type(message).__name__}")
        if len(message) > MAX_PROGRESS_MESSAGE:
            raise ValueError(
                f"a progress message must be at most {MAX_PROGRESS_MESSAGE} characters"
            )
        if "\x00" in message:
            raise ValueError("a progress message must not contain NUL characters")
        # One report that can't be stored would fail the worker's write of every report.
        if not is_utf8(message):
            raise ValueError("a progress message must be valid Unicode (no lone surrogates)")
    return value, message


# Fenced as every write of a worker (id + lease token + running). A row locked by someone else
# (a completion of the same job, an operator) is skipped, not waited for: its progress is
# written at the next write. A watched job's waiters hear of the change.
_WRITE_PROGRESS = f"""
WITH free AS (
    SELECT j.id, r.fraction, r.message
    FROM jobs AS j
    JOIN unnest($1::uuid[], $2::uuid[], $3::float8[], $4::text[]) AS r(id, token, fraction, message)
      ON j.id = r.id AND j.lease_token = r.token
    WHERE j.status = 'running'
    ORDER BY j.id
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE jobs AS j
SET progress = jsonb_build_object('fraction', free.fraction, 'message', free.message,
                                  'attempt', j.attempts, 'updated_at', now())
FROM free
WHERE j.id = free.id
RETURNING j.id, {notify_watchers("j")}
"""


class Progress(QueueBase):
    async def write_progress(self, reports: Sequence[ProgressReport]) -> set[Lease]:
        """Store each run's latest progress in one statement; returns the leases written (a
        lease lost, or a row locked by someone else, is not)."""
        if not reports:
            return set()
        ordered = sorted(reports, key=lambda r: r.lease.job_id)
        rows = await self.pool.fetch(
            _WRITE_PROGRESS,
            [r.lease.job_id for r in ordered],
            [r.lease.token for r in ordered],
            [r.fraction for r in ordered],
            [r.message for r in ordered],
        )
        written = {r["id"] for r in rows}
        return {r.lease for r in ordered if r.lease.job_id in written}
