"""Real parts around PostgreSQL for the scale-out tests: a server reachable over TCP, PgBouncer
in transaction pooling mode, and a streaming replica.

Each helper cleans up what it started (processes and directories), also when a test fails.
PgBouncer comes from Debian's package (`make test` installs it when missing and running as
root); PgBouncer refuses to run as root, so as root it runs as `nobody`, with its
configuration in a directory of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobq.embedded import TEST_SETTINGS, EmbeddedPostgres, _run_as

_NOBODY = 65534


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tcp_dsn(host: str, port: int, database: str = "postgres") -> str:
    return f"postgresql://postgres@{host}:{port}/{database}"


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


@contextlib.contextmanager
def tcp_server(
    listen: str = "127.0.0.1",
    *,
    hba_cidr: str | None = None,
    settings: dict[str, str] | None = None,
) -> Iterator[tuple[EmbeddedPostgres, int]]:
    """An embedded PostgreSQL of the test's own that also listens on TCP (trust auth, test
    addresses only); yields the server and its port."""
    root = Path(tempfile.mkdtemp(prefix="jobq-tcp-pg-"))
    port = free_port()
    options = {**TEST_SETTINGS, "listen_addresses": listen, **(settings or {})}
    if hba_cidr is not None:
        hba = root / "pg_hba.conf"
        hba.write_text(
            "local all all trust\nlocal replication all trust\n"
            f"host all all 127.0.0.1/32 trust\nhost all all {hba_cidr} trust\n"
        )
        options["hba_file"] = str(hba)
    server = EmbeddedPostgres(root, settings=options, port=port)
    try:
        server.start()
        yield server, port
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None
    )


def require_pgbouncer() -> str:
    binary = pgbouncer_binary()
    if binary is None:
        pytest.skip(
            "PgBouncer is not installed (`make test` installs Debian's pgbouncer when run as "
            "root; otherwise: apt-get install pgbouncer)"
        )
    return binary


@dataclass(frozen=True)
class Bouncer:
    port: int
    root: Path

    def log(self) -> str:
        return (self.root / "pgbouncer.log").read_text(errors="replace")


@contextlib.contextmanager
def pgbouncer(
    upstream_port: int,
    *,
    pool_mode: str = "transaction",
    pool_size: int = 20,
    max_client_conn: int = 2000,
) -> Iterator[Bouncer]:
    """PgBouncer in front of 127.0.0.1:upstream_port, listening on 127.0.0.1."""
    binary = require_pgbouncer()
    root = Path(tempfile.mkdtemp(prefix="jobq-pgbouncer-"))
    port = free_port()
    (root / "users.txt").write_text('"postgres" ""\n')
    (root / "pgbouncer.ini").write_text(
        f"""[databases]
* = host=127.0.0.1 port={upstream_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {root}/users.txt
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = {max_client_conn}
max_db_connections = {pool_size}
logfile = {root}/pgbouncer.log
pidfile = {root}/pgbouncer.pid
admin_users = postgres
"""
    )
    prefix: list[str] = []
    if os.geteuid() == 0:
        for path in [root, *root.iterdir()]:
            os.chown(path, _NOBODY, _NOBODY)
        prefix = ["setpriv", f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups", "--"]
    proc = subprocess.Popen(
        [*prefix, binary, str(root / "pgbouncer.ini")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port("127.0.0.1", port, proc, timeout=20)
        yield Bouncer(port, root)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # SIGINT: safe shutdown, waits for no client
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def streaming_replica(primary: EmbeddedPostgres) -> Iterator[EmbeddedPostgres]:
    """A hot standby of `primary`, made with pg_basebackup and streaming from it."""
    root = Path(tempfile.mkdtemp(prefix="jobq-replica-"))
    pgdata = root / f"pg{primary.major}"
    assert primary._socket_dir is not None
    cmd = [
        *_run_as([root]),
        str(primary.bindir / "pg_basebackup"),
        "-h",
        primary._socket_dir,
        "-p",
        str(primary.port),
        "-U",
        "postgres",
        "-D",
        str(pgdata),
        "-R",  # standby.signal and primary_conninfo
        "-X",
        "stream",
        "--no-sync",
    ]
    replica = EmbeddedPostgres(
        root, settings={**TEST_SETTINGS, "hot_standby": "on"}, port=primary.port
    )
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        replica.start()
        yield replica
    finally:
        replica.stop()
        shutil.rmtree(root, ignore_errors=True)
