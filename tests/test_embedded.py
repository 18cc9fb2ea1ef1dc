"""The embedded PostgreSQL used when no DATABASE_URL is set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import pytest

from jobq.embedded import TEST_SETTINGS, EmbeddedPostgres

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("DATABASE_URL")), reason="uses the embedded server by design"
)

OWNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from jobq.embedded import EmbeddedPostgres, TEST_SETTINGS
    server = EmbeddedPostgres(Path(sys.argv[1]), settings=TEST_SETTINGS)
    print(server.start(), flush=True)
    time.sleep(600)
    """
)


async def test_data_survives_a_restart(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "data", settings=TEST_SETTINGS)
    dsn = server.start()
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (1)")
    await conn.close()
    server.stop()
    again = EmbeddedPostgres(tmp_path / "data", settings=TEST_SETTINGS)
    conn = await asyncpg.connect(again.start())
    try:
        assert await conn.fetchval("SELECT x FROM kept") == 1
    finally:
        await conn.close()
        again.stop()


async def test_listens_on_a_private_unix_socket_only(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "data", settings=TEST_SETTINGS)
    conn = await asyncpg.connect(server.start())
    try:
        assert await conn.fetchval("SHOW listen_addresses") == ""
        socket_dir = Path(await conn.fetchval("SHOW unix_socket_directories"))
        assert socket_dir.stat().st_mode & 0o077 == 0
    finally:
        await conn.close()
        server.stop()


async def test_a_new_start_after_the_owner_was_killed_succeeds(tmp_path: Path) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path / "data")], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    first_dsn = owner.stdout.readline().strip()
    assert first_dsn.startswith("postgresql://")
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait(timeout=10)
    owner.stdout.close()
    server = EmbeddedPostgres(tmp_path / "data", settings=TEST_SETTINGS)
    conn = await asyncpg.connect(server.start())
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert server.owned  # the old server shut down with its owner; this one is ours
    finally:
        await conn.close()
        server.stop()


async def test_a_second_process_attaches_to_the_running_server(tmp_path: Path) -> None:
    owner = EmbeddedPostgres(tmp_path / "data", settings=TEST_SETTINGS)
    owner.start()
    guest = EmbeddedPostgres(tmp_path / "data", settings=TEST_SETTINGS)
    try:
        dsn = guest.start()
        assert not guest.owned
        conn = await asyncpg.connect(dsn)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
    finally:
        guest.stop()
        owner.stop()
