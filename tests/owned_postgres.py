"""A PostgreSQL server a test module owns, so that it can stop and restart it.

The suite's shared server must never go down under other tests; tests of database outages
start their own (always embedded, whatever DATABASE_URL says). Its socket directory is fixed,
so the DSN stays valid across restarts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from jobq import db, schema
from jobq.embedded import TEST_SETTINGS, EmbeddedPostgres


def start_server(root: Path) -> EmbeddedPostgres:
    server = EmbeddedPostgres(root, settings=TEST_SETTINGS)
    server.start()
    return server


async def migrate(dsn: str) -> None:
    conn = await db.connect(dsn)
    try:
        await schema.migrate(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """Started from the main thread: the server dies with the thread that spawned it."""
    server = start_server(tmp_path_factory.mktemp("own-pg"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def own_dsn(own_server: EmbeddedPostgres) -> str:
    dsn = own_server.dsn()
    await migrate(dsn)
    return dsn
