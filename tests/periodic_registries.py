"""A registry with a periodic schedule, for worker processes in tests
(`python -m jobq worker tests.periodic_registries:every_second`)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from jobq.registry import JobContext, Registry
from tests.registries import _executions_pool

every_second = Registry()


@every_second.periodic(every=timedelta(seconds=1))
@every_second.handler("tick.record")
async def record_tick(ctx: JobContext, payload: dict[str, Any]) -> None:
    """One row per run in `executions` (made by the test): which job ran, in which process."""
    pool = await _executions_pool()
    await pool.execute(
        "INSERT INTO executions (job_id, attempt, pid) VALUES ($1, $2, $3)",
        ctx.id,
        ctx.attempt,
        os.getpid(),
    )
