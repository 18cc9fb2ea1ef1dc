"""Periodic jobs on several hosts: exactly one job per tick, none missed.

    python -m bench.cron [--minutes 10] [--hosts 3] [--out bench/results/cron.jsonl]

Runs N `jobq worker bench.cron_app:registry` processes, each on a "host" of its own: as root
(with `unshare`), each in its own UTS and network namespace (its own host name, no network:
it reaches the embedded PostgreSQL through its Unix socket); otherwise as plain processes. Every
worker runs the scheduler for a `* * * * *` and an `every=5s` schedule. The handlers append
one line per run to files of their own (`bench/cron_app.py`); from those alone the benchmark
puts each run in the tick whose period holds its start and counts, over the ticks between
the first declaration and the stop: ticks with no run (missed), ticks with more than one job
(duplicates), and runs of one job more than once. jobq's tables are read only to cross-check
(each job's tick is its run_at).

Against DATABASE_URL when set (then the workers stay in the host's network), otherwise an
embedded PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench import suite

ROOT = Path(__file__).resolve().parent.parent
PERIODS = {"bench.cron.minutely": 60.0, "bench.cron.every5s": 5.0}


def namespaces_usable(dsn: str) -> bool:
    """Root with unshare, and a database reached through a Unix socket (a namespace of its
    own has no network)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or "host=%2F" not in dsn:
        return False
    probe = subprocess.run(
        ["unshare", "--uts", "--net", "--", "true"], check=False, capture_output=True, timeout=10
    )
    return probe.returncode == 0


def start_worker(dsn: str, host: str, records: Path, isolate: bool) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "jobq", "worker", "bench.cron_app:registry", "--concurrency", "4"]
    if isolate:
        # A host of its own: its own host name (what worker ids and the records carry) and no
        # network but loopback.
        cmd = ["unshare", "--uts", "--net", "--", "sh", "-c",
               f'hostname {host} && exec "$@"', "sh", *cmd]  # fmt: skip
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "JOBQ_LOG_LEVEL": "WARNING",
        "JOBQ_BENCH_CRON_RECORDS": str(records),
    }
    return subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)


def read_records(records: Path) -> list[tuple[str, str, float, str]]:
    out = []
    for path in records.iterdir():
        for line in path.read_text().splitlines():
            kind, job_id, at, host = line.split("\t")
            out.append((kind, job_id, float(at), host))
    return out


def analyse(
    runs: list[tuple[str, str, float, str]], first: float, stop: float
) -> dict[str, dict[str, Any]]:
    """Per schedule, from the handlers' records only: the ticks in (first, stop - 2 s] and
    what ran in each."""
    out: dict[str, dict[str, Any]] = {}
    for kind, period in PERIODS.items():
        mine = [r for r in runs if r[0] == kind]
        by_tick: dict[float, set[str]] = defaultdict(set)
        starts: dict[str, list[float]] = defaultdict(list)
        for _, job_id, at, _ in mine:
            tick = (at // period) * period
            by_tick[tick].add(job_id)
            starts[job_id].append(at)
        expected = []
        tick = (first // period + 1) * period
        while tick <= stop - 2.0:
            expected.append(tick)
            tick += period
        lateness = sorted(min(starts[j]) - t for t in expected for j in by_tick.get(t, ()))
        out[kind] = {
            "period_s": period,
            "ticks": len(expected),
            "jobs_run": sum(len(by_tick.get(t, ())) for t in expected),
            "missed": sum(1 for t in expected if not by_tick.get(t)),
            "duplicates": sum(len(by_tick[t]) - 1 for t in expected if len(by_tick.get(t, ())) > 1),
            "runs_of_one_job_more_than_once": sum(1 for s in starts.values() if len(s) > 1),
            "hosts": dict(Counter(r[3] for r in mine)),
            "start_after_tick_ms_p50": round(1000 * statistics.median(lateness), 1)
            if lateness
            else None,
            "start_after_tick_ms_max": round(1000 * lateness[-1], 1) if lateness else None,
        }
    return out


async def cross_check(dsn: str) -> dict[str, dict[str, int]]:
    """What jobq's tables say: jobs per schedule and distinct ticks (run_at)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT kind, count(*) AS jobs, count(DISTINCT run_at) AS ticks FROM"
            " (SELECT kind, run_at FROM jobs UNION ALL SELECT kind, run_at FROM jobs_history) j"
            " GROUP BY kind ORDER BY kind"
        )
    finally:
        await conn.close()
    return {r["kind"]: {"jobs": r["jobs"], "distinct_ticks": r["ticks"]} for r in rows}


async def run(a: argparse.Namespace) -> dict[str, Any]:
    with suite.server() as admin:
        async with suite.fresh_db(admin, "cron") as dsn:
            isolate = namespaces_usable(dsn) and not a.no_namespaces
            with tempfile.TemporaryDirectory(prefix="jobq-cron-") as tmp:
                records = Path(tmp)
                os.chmod(records, 0o777)
                workers = [
                    start_worker(dsn, f"cron-host-{i}", records, isolate) for i in range(a.hosts)
                ]
                conn = await asyncpg.connect(dsn)
                try:
                    deadline = time.monotonic() + 60
                    while not await conn.fetchval("SELECT count(*) FROM jobq_schedules"):
                        if time.monotonic() > deadline:
                            raise SystemExit("no worker declared the schedules within 60 s")
                        await asyncio.sleep(0.1)
                    first = await conn.fetchval("SELECT min(created_at) FROM jobq_schedules")
                finally:
                    await conn.close()
                first_s = first.timestamp()
                print(f"schedules declared at {first.isoformat()}; running {a.minutes} min on"
                      f" {a.hosts} {'namespaced hosts' if isolate else 'processes'}",
                      file=sys.stderr, flush=True)  # fmt: skip
                await asyncio.sleep(a.minutes * 60)
                stop = time.time()
                for w in workers:
                    os.killpg(w.pid, signal.SIGTERM)
                codes = [await asyncio.to_thread(w.wait, 60) for w in workers]
                runs = read_records(records)
            db_view = await cross_check(dsn)
    return {
        "bench": "cron",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "minutes": a.minutes,
        "hosts": a.hosts,
        "isolation": "uts+net namespaces" if isolate else "processes",
        "exit_codes": codes,
        "window": [
            datetime.fromtimestamp(first_s, UTC).isoformat(),
            datetime.fromtimestamp(stop, UTC).isoformat(),
        ],
        "schedules": analyse(runs, first_s, stop),
        "jobq_tables": db_view,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--no-namespaces", action="store_true", help="plain processes even as root")
    p.add_argument("--out", type=Path, default=suite.RESULTS / "cron.jsonl")
    a = p.parse_args()
    result = asyncio.run(run(a))
    line = json.dumps(result)
    print(line)
    with a.out.open("a") as f:
        f.write(line + "\n")
    for kind, s in result["schedules"].items():
        print(f"{kind}: {s['ticks']} ticks, {s['jobs_run']} jobs run, {s['missed']} missed,"
              f" {s['duplicates']} duplicates, start after tick p50 {s['start_after_tick_ms_p50']}"
              f" ms, max {s['start_after_tick_ms_max']} ms, hosts {s['hosts']}",
              file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
