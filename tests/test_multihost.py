"""Workers on several hosts: three worker processes, each in a network namespace of its own
(`ip netns` + veth, created by the test), against PostgreSQL listening on the veth addresses.

Addresses come from 198.18.0.0/15, the range set aside for network tests (RFC 2544); they
exist only on the veth pairs this test creates. Needs root and a kernel that allows network
namespaces; skipped otherwise.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from jobq import db, schema
from jobq.queue import NewJob, Queue
from tests.helpers import ALL_JOBS, ROOT, wait_for
from tests.realparts import tcp_server
from tests.servers import stop

JOBS = 20_000
HOSTS = 3


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"jobq-probe-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"`ip netns add` does not work here: {exc}"
    _ip("netns", "del", probe)
    return None


@contextlib.contextmanager
def hosts(n: int) -> Iterator[tuple[int, list[tuple[str, str, str]]]]:
    """n namespaces, each joined to this host by a veth pair. Yields the /24's third octet and
    (namespace, host-side address, namespace-side address) per namespace."""
    tag = uuid.uuid4().hex[:6]
    octet = random.randint(0, 255)
    made: list[tuple[str, str]] = []
    try:
        out = []
        for i in range(n):
            ns, host_if, ns_if = f"jobq-{tag}-{i}", f"jqh{tag}{i}", f"jqn{tag}{i}"
            _ip("netns", "add", ns)
            made.append((ns, host_if))
            _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
            host_addr, ns_addr = f"198.18.{octet}.{4 * i + 1}", f"198.18.{octet}.{4 * i + 2}"
            _ip("addr", "add", f"{host_addr}/30", "dev", host_if)
            _ip("link", "set", host_if, "up")
            _ip("-n", ns, "addr", "add", f"{ns_addr}/30", "dev", ns_if)
            _ip("-n", ns, "link", "set", ns_if, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            out.append((ns, host_addr, ns_addr))
        yield octet, out
    finally:
        for ns, host_if in made:
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _ip("netns", "del", ns)  # takes the veth pair with it
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _ip("link", "del", host_if)


async def test_three_workers_on_three_hosts_run_each_of_20000_jobs_exactly_once() -> None:
    reason = _netns_usable()
    if reason:
        pytest.skip(reason)
    marks = Path(tempfile.mkdtemp(prefix="jobq-multihost-"))
    with hosts(HOSTS) as (octet, nets):
        listen = ",".join(host_addr for _, host_addr, _ in nets)
        with tcp_server(listen, hba_cidr=f"198.18.{octet}.0/24") as (server, port):
            conn = await db.connect(server.dsn())
            try:
                await schema.migrate(conn)
            finally:
                await conn.close()
            procs: list[subprocess.Popen[bytes]] = []
            pool = await db.create_pool(server.dsn(), min_size=1, max_size=2)
            try:
                for ns, host_addr, _ in nets:
                    env = {
                        **os.environ,
                        "DATABASE_URL": f"postgresql://postgres@{host_addr}:{port}/postgres",
                        "PYTHONPATH": str(ROOT),
                        "JOBQ_LOG_LEVEL": "WARNING",
                        "JOBQ_TEST_MARKS": str(marks),
                    }
                    procs.append(
                        subprocess.Popen(
                            ["ip", "netns", "exec", ns, sys.executable, "-m", "jobq", "worker",
                             "tests.registries:recording", "--concurrency", "50"],
                            env=env,
                            cwd=ROOT,
                        )
                    )  # fmt: skip

                async def three_workers() -> bool:
                    for p in procs:
                        assert p.poll() is None, "a worker exited"
                    n = await pool.fetchval("SELECT count(*) FROM jobq_workers")
                    return bool(n == HOSTS)

                await wait_for(three_workers, timeout=60, interval=0.1)
                queue = Queue(pool)
                for start in range(0, JOBS, 5000):
                    await queue.enqueue_many(
                        [NewJob(kind="mark") for _ in range(start, min(JOBS, start + 5000))]
                    )

                async def drained() -> bool:
                    sql = f"SELECT count(*) FROM {ALL_JOBS} WHERE status = 'succeeded'"
                    n = await pool.fetchval(sql)
                    return bool(n == JOBS)

                await wait_for(drained, timeout=240, interval=0.25)
                clients = await pool.fetch(
                    "SELECT DISTINCT host(client_addr) AS a FROM pg_stat_activity"
                    " WHERE application_name LIKE 'jobq worker%'"
                )
            finally:
                for p in procs:
                    stop(p)
                await pool.close()
    try:
        runs: list[str] = []
        per_process = []
        for f in marks.iterdir():
            lines = f.read_text().split()
            per_process.append(len(lines))
            runs += lines
    finally:
        shutil.rmtree(marks, ignore_errors=True)
    assert len(runs) == JOBS
    assert len(set(runs)) == JOBS  # each job ran exactly once
    assert len(per_process) == HOSTS and min(per_process) > 0
    assert {r["a"] for r in clients} == {ns_addr for _, _, ns_addr in nets}
    assert all(isinstance(c, asyncpg.Record) for c in clients)
