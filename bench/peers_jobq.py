#!/usr/bin/env python
"""jobq adapter for the peers harness (`../shared/peers/`), against jobq's public API.

Schema: `jobq.schema.migrate` (what `jobq migrate` runs). Enqueue: `Queue.enqueue_many`
(one `INSERT ... SELECT FROM unnest(...)` per call) in chunks of --enqueue-chunk.
Worker: `jobq.Worker` with one no-op async handler, --procs processes, --concurrency jobs in
flight per process, claim batches sized to the free slots (at most --batch-size).
Completion is verified as `status = 'succeeded'` rows in `jobs`.

run_all.sh puts the harness folder on PYTHONPATH, which is where `common` comes from:

    PEERS_BENCH_jobq="$PWD/bench/peers_jobq.py" ../shared/peers/run_all.sh --systems "jobq ..."
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import common  # type: ignore[import-not-found]  # the harness's driver (on PYTHONPATH)

KIND = "noop"


async def _worker(cfg: dict[str, Any], probe: Any, ctl: Any) -> None:
    from jobq import JobContext, Registry, Worker
    from jobq.settings import Settings

    registry = Registry()

    @registry.handler(KIND)
    async def noop(ctx: JobContext, payload: dict[str, Any]) -> None:
        probe.hit(payload.get("t0"))  # the no-op handler (identical in every adapter)

    worker = Worker(
        cfg["url"],
        registry,
        concurrency=cfg["concurrency"],
        batch_size=cfg["batch_size"],
        settings=Settings.from_env(),
    )
    task = asyncio.create_task(worker.run())
    await worker.wait_started()
    ctl.ready()
    await ctl.wait_stop()
    worker.request_stop()
    await task


def worker_fn(cfg: dict[str, Any], probe: Any, ctl: Any) -> None:
    os.environ.setdefault("JOBQ_LOG_LEVEL", "WARNING")
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    common.run_async(_worker(cfg, probe, ctl), cfg["loop"])


class JobqAdapter(common.Adapter):  # type: ignore[misc]
    name = "jobq"
    worker_fn = staticmethod(worker_fn)

    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        p.add_argument("--concurrency", type=int, default=500)
        p.add_argument("--batch-size", type=int, default=250)
        p.add_argument(
            "--enqueue-chunk",
            type=int,
            default=5000,
            help="jobs per enqueue_many() call in the bulk test, 0 = all in one call",
        )
        p.set_defaults(procs=2)  # one per core

    def version(self) -> str:
        from importlib.metadata import version

        return version("jobq")

    def settings(self) -> dict[str, Any]:
        a = self.args
        return {
            "procs": a.procs,
            "lat_procs": a.lat_procs,
            "concurrency": a.concurrency,
            "batch_size": a.batch_size,
            "enqueue_chunk": a.enqueue_chunk or a.n,
            "loop": a.loop,
        }

    def worker_cfg(self, phase: str) -> dict[str, Any]:
        a = self.args
        return {
            "url": a.url,
            "phase": phase,
            "loop": a.loop,
            "concurrency": a.concurrency,
            "batch_size": a.batch_size,
        }

    async def open(self) -> None:
        from jobq import Queue, db

        self.pool = await db.create_pool(self.args.url, min_size=1, max_size=2)
        self.queue = Queue(self.pool)

    async def close(self) -> None:
        await self.pool.close()

    async def install_schema(self) -> None:
        from jobq import schema

        async with self.pool.acquire() as conn:
            await schema.migrate(conn)

    async def enqueue_bulk(self, payloads: list[dict[str, Any]]) -> None:
        from jobq import NewJob

        chunk = self.args.enqueue_chunk or len(payloads)
        for s in range(0, len(payloads), chunk):
            await self.queue.enqueue_many([NewJob(KIND, p) for p in payloads[s : s + chunk]])

    async def enqueue_one(self, payload: dict[str, Any]) -> None:
        from jobq import NewJob

        await self.queue.enqueue(NewJob(KIND, payload))

    async def count_done(self) -> int:
        # Finished jobs are in jobs_history (schema 4 on); rows version 3 finished stay in jobs.
        n = await self.pool.fetchval(
            "SELECT (SELECT count(*) FROM jobs WHERE status = 'succeeded')"
            " + (SELECT count(*) FROM jobs_history WHERE status = 'succeeded')"
        )
        return int(n)

    async def analyze(self) -> None:
        await self.pool.execute("ANALYZE")


if __name__ == "__main__":
    common.main(JobqAdapter)
