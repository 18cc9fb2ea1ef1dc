"""The registry the cron benchmark's workers run (`bench.cron`): a `* * * * *` and an
`every=5s` schedule, each handler appending a line per run to a file of its process's own in
$JOBQ_BENCH_CRON_RECORDS: the benchmark's record of runs, independent of jobq's tables."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Any, TextIO

from jobq.registry import JobContext, Registry

registry = Registry()

_records: TextIO | None = None


def _record(ctx: JobContext) -> None:
    global _records
    if _records is None:
        path = os.path.join(
            os.environ["JOBQ_BENCH_CRON_RECORDS"], f"{socket.gethostname()}-{os.getpid()}"
        )
        _records = open(path, "a", buffering=1)  # noqa: SIM115 - one file per process
    _records.write(f"{ctx.kind}\t{ctx.id}\t{time.time():.6f}\t{socket.gethostname()}\n")


@registry.periodic("* * * * *")
@registry.handler("bench.cron.minutely")
def minutely(ctx: JobContext, payload: dict[str, Any]) -> None:
    _record(ctx)


@registry.periodic(every=timedelta(seconds=5))
@registry.handler("bench.cron.every5s")
def every5s(ctx: JobContext, payload: dict[str, Any]) -> None:
    _record(ctx)
