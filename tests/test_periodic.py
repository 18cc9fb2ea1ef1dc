"""Periodic schedules as declared: their ticks (time zones, DST, intervals) and the errors a
mistake raises at registration."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic
import pytest

from jobq.periodic import Schedule
from jobq.registry import JobContext, Registry
from tests.helpers import ROOT


def ticks(schedule: Schedule, start: datetime, end: datetime) -> list[str]:
    """The ticks in (start, end], as UTC times."""
    out = itertools.takewhile(lambda t: t <= end, schedule.ticks_after(start))
    return [t.strftime("%m-%d %H:%MZ") for t in out]


def paris(cron: str) -> Schedule:
    return Schedule(name="s", kind="k", cron=cron, tz="Europe/Paris")


# Europe/Paris in 2026: clocks go 02:00 CET -> 03:00 CEST on 29 March (01:00Z), and 03:00 CEST
# -> 02:00 CET on 25 October (01:00Z).
SPRING = (datetime(2026, 3, 28, 12, tzinfo=UTC), datetime(2026, 3, 30, 12, tzinfo=UTC))
FALL = (datetime(2026, 10, 24, 12, tzinfo=UTC), datetime(2026, 10, 26, 12, tzinfo=UTC))


def test_a_daily_time_skipped_by_spring_forward_runs_once_at_the_first_minute_after() -> None:
    # 02:30 does not exist on 29 March: that day's run is at 03:00 CEST (01:00Z), once.
    assert ticks(paris("30 2 * * *"), *SPRING) == ["03-29 01:00Z", "03-30 00:30Z"]


def test_a_daily_time_repeated_by_fall_back_runs_once_at_its_first_occurrence() -> None:
    # 02:30 happens twice on 25 October (00:30Z in CEST, 01:30Z in CET): one run, the first.
    assert ticks(paris("30 2 * * *"), *FALL) == ["10-25 00:30Z", "10-26 01:30Z"]


def test_an_hourly_schedule_ticks_every_real_hour_across_both_transitions() -> None:
    spring = ticks(paris("0 * * * *"), datetime(2026, 3, 28, 23, tzinfo=UTC),
                   datetime(2026, 3, 29, 3, tzinfo=UTC))  # fmt: skip
    assert spring == ["03-29 00:00Z", "03-29 01:00Z", "03-29 02:00Z", "03-29 03:00Z"]
    fall = ticks(paris("0 * * * *"), datetime(2026, 10, 24, 23, tzinfo=UTC),
                 datetime(2026, 10, 25, 3, tzinfo=UTC))  # fmt: skip
    assert fall == ["10-25 00:00Z", "10-25 01:00Z", "10-25 02:00Z", "10-25 03:00Z"]


def test_a_schedule_started_inside_the_repeated_hour_does_not_run_its_time_again() -> None:
    # 00:40Z on 25 October is 02:40 CEST; the 02:30 of the second (CET) 02:00 hour is not a tick.
    inside = datetime(2026, 10, 25, 0, 40, tzinfo=UTC)
    assert ticks(paris("30 2 * * *"), inside, FALL[1]) == ["10-26 01:30Z"]


def test_every_ticks_are_multiples_of_the_interval_since_the_unix_epoch() -> None:
    s = Schedule(name="s", kind="k", every=timedelta(seconds=7))
    start = datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
    first, second = itertools.islice(s.ticks_after(start), 2)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert (first - epoch) % timedelta(seconds=7) == timedelta(0)
    assert start < first <= start + timedelta(seconds=7)
    assert second - first == timedelta(seconds=7)


def test_only_the_latest_tick_within_the_catch_up_window_is_due() -> None:
    s = Schedule(name="s", kind="k", every=timedelta(minutes=1), catch_up=timedelta(minutes=5))
    last = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
    assert s.due(last, last + timedelta(seconds=59)) is None
    assert s.due(last, last + timedelta(minutes=30, seconds=5)) == last + timedelta(minutes=30)
    daily = Schedule(name="d", kind="k", cron="0 3 * * *", catch_up=timedelta(hours=1))
    three = datetime(2026, 6, 1, 3, tzinfo=UTC)
    assert daily.due(three - timedelta(days=1), three + timedelta(minutes=59)) == three
    assert daily.due(three - timedelta(days=1), three + timedelta(minutes=61)) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "61 * * * *"}, "invalid cron expression '61 \\* \\* \\* \\*': Bad minute"),
        ({"cron": "* * * *"}, "invalid cron expression '\\* \\* \\* \\*': it must have 5"),
        ({"cron": "0 0 31 2 *"}, "invalid cron expression '0 0 31 2 \\*'"),
        ({"cron": "0 3 * * *", "tz": "Europe/Pariss"}, "unknown time zone 'Europe/Pariss'"),
        ({"every": timedelta(0)}, "every= must be a timedelta"),
        ({"every": timedelta(seconds=5), "tz": "Europe/Paris"}, "tz= applies to cron"),
        ({}, "give a cron expression or every="),
        ({"cron": "* * * * *", "catch_up": timedelta(seconds=1)}, "catch_up must be"),
        ({"cron": "* * * * *", "payload": {"x": float("nan")}}, "NaN"),
        ({"cron": "* * * * *", "payload": [1]}, "payload must be a mapping"),
        ({"cron": "* * * * *", "name": ""}, "name: must be a non-empty string"),
    ],
)
def test_a_mistake_in_a_schedule_is_a_value_error_at_registration(
    kwargs: dict[str, Any], message: str
) -> None:
    registry = Registry()
    with pytest.raises(ValueError, match=message):
        registry.periodic(kind="report.daily", **kwargs)
    with pytest.raises(ValueError, match=message):
        registry.periodic(**kwargs)  # the decorator form: at the line, not when applied
    assert registry.schedules == []


def test_the_decorator_form_schedules_the_handler_it_sits_on() -> None:
    registry = Registry()

    @registry.periodic("*/5 * * * *", tz="Europe/Paris", payload={"scope": "all"})
    @registry.handler("report.daily")
    async def report(ctx: JobContext, payload: dict[str, Any]) -> None: ...

    (s,) = registry.schedules
    assert (s.name, s.kind, s.spec, dict(s.payload)) == (
        "report.daily", "report.daily", "cron */5 * * * * (Europe/Paris)", {"scope": "all"},
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"above @registry\.handler"):

        @registry.periodic(every=timedelta(seconds=30))
        async def not_a_handler(ctx: JobContext, payload: dict[str, Any]) -> None: ...


class Report(pydantic.BaseModel):
    n: int


def test_a_payload_its_handler_s_model_refuses_is_a_value_error_at_registration() -> None:
    registry = Registry()
    with pytest.raises(ValueError, match=r"schedule 'typed'.*payload for 'typed' is invalid"):

        @registry.periodic("* * * * *", payload={"n": "not a number"})
        @registry.handler("typed")
        async def typed(ctx: JobContext, payload: Report) -> None: ...

    assert registry.schedules == []


def test_a_schedule_declared_before_its_handler_is_checked_when_the_handler_comes() -> None:
    registry = Registry()
    registry.periodic("* * * * *", kind="typed", payload={"n": "not a number"})
    with pytest.raises(ValueError, match=r"schedule 'typed'.*payload for 'typed' is invalid"):

        @registry.handler("typed")
        async def typed(ctx: JobContext, payload: Report) -> None: ...


def test_two_schedules_of_one_kind_need_names_of_their_own() -> None:
    registry = Registry()
    registry.periodic("0 * * * *", kind="sync")
    with pytest.raises(ValueError, match="already registered"):
        registry.periodic(every=timedelta(minutes=5), kind="sync")
    registry.periodic(every=timedelta(minutes=5), kind="sync", name="sync.often")
    assert [s.name for s in registry.schedules] == ["sync", "sync.often"]


def test_a_worker_refuses_a_bad_cron_expression_at_start_up() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": "postgresql://nowhere/none"}
    done = subprocess.run(
        [sys.executable, "-m", "jobq", "worker", "tests.bad_schedule:registry"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: importing tests.bad_schedule failed at tests/bad_schedule.py:7: ValueError:"
        " schedule 'report.daily': invalid cron expression '61 * * * *': Bad minute"
    )
