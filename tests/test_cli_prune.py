"""`jobq prune` as an operator runs it: explicit horizons, dry runs, what it prints."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from jobq.queue import history
from tests.test_cli import jobq
from tests.test_retention import DAY, add_history, counted, exists, make_leaf, now, reset_history


@pytest.fixture
async def db(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    await reset_history(pool)
    yield pool


def prune(dsn: str, *args: str, **env: str) -> tuple[int, str, str]:
    result = jobq("prune", *args, env={"DATABASE_URL": dsn, **env})
    return result.returncode, result.stdout, result.stderr


async def test_prune_dry_run_says_what_would_go_and_changes_nothing(
    db: asyncpg.Pool, dsn: str
) -> None:
    t = await now(db)
    old = await make_leaf(db, "done", t - 10 * DAY)
    await add_history(db, "succeeded", t - 10 * DAY, 3)

    code, out, err = prune(dsn, "--dry-run")

    assert code == 0, err
    assert f"would remove {old} (succeeded, cancelled finished" in out
    assert "~3 rows (estimated)" in out
    assert "nothing was changed" in out
    assert await exists(db, old)
    assert await counted(db) == {"succeeded": 3}


async def test_prune_removes_a_leaf_past_older_than_and_prints_it(
    db: asyncpg.Pool, dsn: str
) -> None:
    t = await now(db)
    old = await make_leaf(db, "done", t - 3 * DAY)
    await add_history(db, "succeeded", t - 3 * DAY, 2)

    code, out, err = prune(dsn, "--older-than", "2d")

    assert code == 0, err
    assert f"removed {old} (succeeded, cancelled finished" in out
    assert "removed 1 leaf(s), 2 row(s)" in out
    assert not await exists(db, old)
    assert await counted(db) == {}


async def test_prune_of_one_status_cuts_through_a_leaf_in_batches_and_keeps_the_rest(
    db: asyncpg.Pool, dsn: str
) -> None:
    t = await now(db)
    leaf = await make_leaf(db, "failed", t - 3 * DAY)
    lower: object = await db.fetchval(
        "SELECT lower_bound FROM jobq_history_partitions WHERE name = $1", leaf
    )
    assert isinstance(lower, type(t))
    # More rows before the horizon than one batch holds; a few after it.
    await add_history(db, "failed_permanent", lower + timedelta(hours=1), history.BATCH_SIZE + 1)
    await add_history(db, "failed_permanent", lower + timedelta(hours=20), 5)
    done = await make_leaf(db, "done", t - 3 * DAY)
    await add_history(db, "succeeded", lower + timedelta(hours=1), 2)
    horizon_age = int((t - (lower + timedelta(hours=12))).total_seconds())

    code, out, err = prune(dsn, "--status", "failed_permanent", "--older-than", f"{horizon_age}s")

    assert code == 0, err
    assert f"deleted {history.BATCH_SIZE + 1:,} failed_permanent rows finished before" in out, out
    assert "in 2 batch(es) of at most 10,000" in out
    assert await exists(db, leaf) and await exists(db, done)
    assert await counted(db) == {"failed_permanent": 5, "succeeded": 2}
    assert await db.fetchval("SELECT count(*) FROM jobs_history") == 7


async def test_prune_dry_run_of_a_cut_through_a_leaf_counts_the_rows_and_deletes_none(
    db: asyncpg.Pool, dsn: str
) -> None:
    t = await now(db)
    await make_leaf(db, "done", t)
    await add_history(db, "cancelled", t - timedelta(seconds=5), 4)

    code, out, err = prune(dsn, "--status", "cancelled", "--older-than", "1s", "--dry-run")

    assert code == 0, err
    assert "would delete 4 cancelled rows" in out
    assert await counted(db) == {"cancelled": 4}


@pytest.mark.parametrize("value", ["7", "7x", "0d", "-1d", "1.5h", "off"])
def test_prune_refuses_an_older_than_that_is_not_a_duration_with_exit_2(value: str) -> None:
    code, _out, err = prune("postgresql://nobody@127.0.0.1:1/none", "--older-than", value)
    assert code == 2
    assert err.startswith("error: --older-than: expected a duration such as 90s, 15m, 12h or 7d")


@pytest.mark.parametrize("status", ["queued", "running", "retrying", "done"])
def test_prune_refuses_a_status_that_is_not_a_final_one_with_exit_2(status: str) -> None:
    code, _out, err = prune("postgresql://nobody@127.0.0.1:1/none", "--status", status)
    assert code == 2
    assert "--status must be one of succeeded, cancelled, failed_permanent" in err


def test_a_bad_retention_setting_stops_the_command_with_one_line_and_exit_2() -> None:
    code, _out, err = prune("postgresql://nobody@127.0.0.1:1/none", JOBQ_RETENTION="a week")
    assert code == 2
    assert err.strip() == (
        "error: JOBQ_RETENTION must be a duration such as 90s, 15m, 12h or 7d, or off, got 'a week'"
    )


async def test_prune_with_retention_off_and_no_horizon_removes_nothing_and_says_why(
    db: asyncpg.Pool, dsn: str
) -> None:
    t = await now(db)
    old = await make_leaf(db, "done", t - 400 * DAY)

    code, out, err = prune(dsn, JOBQ_RETENTION="off", JOBQ_RETENTION_FAILED="off")

    assert code == 0, err
    assert "JOBQ_RETENTION and JOBQ_RETENTION_FAILED are off" in out
    assert "nothing to remove" in out
    assert await exists(db, old)


async def test_prune_with_the_database_unreachable_exits_1_naming_it() -> None:
    code, _out, err = prune("postgresql://postgres@127.0.0.1:1/jobq")
    assert code == 1
    assert "cannot reach the database at 127.0.0.1:1/jobq" in err
