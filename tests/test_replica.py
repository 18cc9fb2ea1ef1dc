"""A streaming replica (pg_basebackup of a server of this module's own): lag-tolerant reads go
to JOBQ_READ_DATABASE_URL, a client reads its own writes, a write on a standby is a 503."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from jobq import db, schema
from jobq.api import create_app
from jobq.embedded import TEST_SETTINGS, EmbeddedPostgres
from jobq.settings import Settings
from tests.helpers import ALL_JOBS, wait_for, worker_process
from tests.realparts import streaming_replica
from tests.servers import stop


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("primary"), settings=TEST_SETTINGS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def primary_pool(primary: EmbeddedPostgres) -> AsyncIterator[asyncpg.Pool]:
    conn = await db.connect(primary.dsn())
    try:
        await schema.migrate(conn)
    finally:
        await conn.close()
    pool = await db.create_pool(primary.dsn(), min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(scope="module")
def replica(primary: EmbeddedPostgres, primary_pool: asyncpg.Pool) -> Iterator[EmbeddedPostgres]:
    with streaming_replica(primary) as standby:
        yield standby


@pytest.fixture(scope="module")
async def replica_pool(replica: EmbeddedPostgres) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(replica.dsn(), min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


async def _replay(replica_pool: asyncpg.Pool, *, paused: bool) -> None:
    await replica_pool.execute(f"SELECT pg_wal_replay_{'pause' if paused else 'resume'}()")
    want = "paused" if paused else "not paused"

    async def reached() -> bool:
        return bool(await replica_pool.fetchval("SELECT pg_get_wal_replay_pause_state()") == want)

    await wait_for(reached, timeout=10)


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")  # type: ignore[arg-type]


async def test_lists_and_stats_read_the_replica_while_get_after_post_reads_the_primary(
    primary_pool: asyncpg.Pool, replica_pool: asyncpg.Pool
) -> None:
    app = create_app(Settings(), pool=primary_pool, read_pool=replica_pool)
    await _replay(replica_pool, paused=True)
    try:
        async with app.router.lifespan_context(app), _client(app) as c:
            created = await c.post("/jobs", json={"kind": "lagging", "queue": "replica"})
            assert created.status_code == 201
            job_id = created.json()["id"]
            # Read-your-writes: the job is there at once, although the replica has not seen it.
            assert (await c.get(f"/jobs/{job_id}")).status_code == 200
            listed = (await c.get("/jobs", params={"queue": "replica"})).json()
            assert [j["id"] for j in listed["jobs"]] == []
            stats = (await c.get("/stats")).json()
            assert "replica" not in str(stats["queues"])
            await _replay(replica_pool, paused=False)

            async def listed_now() -> bool:
                page = (await c.get("/jobs", params={"queue": "replica"})).json()
                return [j["id"] for j in page["jobs"]] == [job_id]

            await wait_for(listed_now, timeout=10)
    finally:
        await _replay(replica_pool, paused=False)


async def test_a_write_that_reaches_a_read_only_standby_is_a_503_problem(
    primary_pool: asyncpg.Pool, replica_pool: asyncpg.Pool
) -> None:
    job_id = await primary_pool.fetchval("INSERT INTO jobs (kind) VALUES ('k') RETURNING id")

    async def replicated() -> bool:
        return bool(await replica_pool.fetchval("SELECT count(*) FROM jobs WHERE id = $1", job_id))

    await wait_for(replicated, timeout=10)
    app = create_app(Settings(), pool=replica_pool)
    async with app.router.lifespan_context(app), _client(app) as c:
        for response in (
            await c.post("/jobs", json={"kind": "k"}),
            await c.post(f"/jobs/{job_id}/cancel"),
        ):
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["retry-after"]
            assert response.json()["error"] == "database_read_only"
        assert (await c.get(f"/jobs/{job_id}")).status_code == 200


async def test_a_worker_pointed_at_a_standby_says_so_once_and_waits_for_the_promotion(
    primary: EmbeddedPostgres, primary_pool: asyncpg.Pool
) -> None:
    log = Path(tempfile.mkstemp(prefix="jobq-standby-worker-", suffix=".log")[1])
    with streaming_replica(primary) as standby, log.open("wb") as err:
        worker = worker_process(
            standby.dsn(),
            "tests.registries:recording",
            env={"JOBQ_POLL_INTERVAL_SECONDS": "0.1"},
            stderr=err,
        )
        try:

            async def said() -> bool:
                assert worker.poll() is None, log.read_text()
                return "read-only standby" in log.read_text()

            await wait_for(said, timeout=30)
            conn = await asyncpg.connect(standby.dsn())
            try:
                await conn.execute("SELECT pg_promote()")
                job = await conn.fetchval(
                    "INSERT INTO jobs (kind, payload) VALUES ('sleep', '{\"seconds\": 0}')"
                    " RETURNING id"
                )

                async def ran() -> bool:
                    return bool(
                        await conn.fetchval(f"SELECT status FROM {ALL_JOBS} WHERE id = $1", job)
                        == "succeeded"
                    )

                await wait_for(ran, timeout=30)
            finally:
                await conn.close()
        finally:
            stop(worker)
    text = log.read_text()
    log.unlink()
    assert worker.returncode == 0, text
    assert text.count("read-only standby") == 1, text
