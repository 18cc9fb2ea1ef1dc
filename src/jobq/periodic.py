"""Periodic jobs: what a schedule is, and which instants are its ticks.

A schedule is declared next to the handlers (`Registry.periodic`) and enqueued by the
scheduler every worker runs (`jobq.maintenance.scheduler`). This module is pure computation:
given the last tick enqueued and the database's now, which tick is due. The rules (also in
docs/scheduling.md):

- A cron schedule's ticks are the instants its 5-field expression names in its time zone, as
  Debian cron runs them (cronsim): on a spring-forward day a time that does not exist (02:30
  in Europe/Paris) runs once, at the first minute that exists after it (03:00); on a
  fall-back day a time that occurs twice runs once, at its first occurrence. Expressions
  with `*` in the minute or hour field tick in real time (an hourly schedule ticks at both
  02:00 of a fall-back night).
- An `every=` schedule ticks at whole multiples of its interval since the Unix epoch (UTC),
  so every worker computes the same ticks whatever its start time or zone.
- Only the latest tick due is enqueued: a tick is due when it is later than the last tick
  enqueued and no older than the schedule's catch-up window. Ticks missed before it (all
  workers down) are not back-filled.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from jobq.queue.model import DEFAULT_QUEUE, NewJob
from jobq.queue.validation import _check_name, encode_json, validate

# How late a tick may still be enqueued when nothing else is said: a deploy or an outage
# shorter than this does not lose a tick; a longer one loses all but the latest within it.
DEFAULT_CATCH_UP = timedelta(hours=1)
# The window must cover a scheduler pass (about a second) with room to spare, and is bounded
# so that finding the latest tick in it stays cheap (a minutely cron has 1,440 ticks a day).
MIN_CATCH_UP = timedelta(seconds=10)
MAX_CATCH_UP = timedelta(days=1)
MIN_EVERY = timedelta(seconds=1)
MAX_EVERY = timedelta(days=366)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


@dataclass(frozen=True)
class Schedule:
    """One periodic job: `kind` with `payload` on `queue`, at each tick of `cron` (in `tz`)
    or of `every`. Made by `Registry.periodic`, which checks every field."""

    name: str
    kind: str
    cron: str | None = None
    every: timedelta | None = None
    tz: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    max_attempts: int | None = None
    catch_up: timedelta = DEFAULT_CATCH_UP

    def __post_init__(self) -> None:
        _check(self)

    @property
    def spec(self) -> str:
        """The schedule as the listings show it: `cron 30 2 * * * (Europe/Paris)`, `every 5s`."""
        if self.every is not None:
            return f"every {_seconds(self.every)}"
        return f"cron {self.cron} ({self.tz or 'UTC'})"

    @property
    def payload_json(self) -> str:
        return encode_json("payload", dict(self.payload))

    def ticks_after(self, after: datetime) -> Iterator[datetime]:
        """The ticks strictly after `after`, in order, as UTC instants."""
        if self.every is not None:
            period = self.every // _US
            k = (after - _EPOCH) // _US // period + 1
            while True:
                yield _EPOCH + k * period * _US
                k += 1
        assert self.cron is not None
        zone = ZoneInfo(self.tz) if self.tz else UTC
        for local in CronSim(self.cron, after.astimezone(zone)):
            tick = local.astimezone(UTC)
            # cronsim counts a fixed hour in local wall time: started inside a repeated hour it
            # may name a wall time that, in the hour's first occurrence, is already past.
            if tick > after:
                yield tick

    def next_after(self, after: datetime) -> datetime:
        return next(self.ticks_after(after))

    def due(self, last_tick: datetime, now: datetime) -> datetime | None:
        """The tick to enqueue now: the latest tick in (last_tick, now] no older than the
        catch-up window; None when there is none."""
        latest = None
        for tick in self.ticks_after(max(last_tick, now - self.catch_up)):
            if tick > now:
                break
            latest = tick
        return latest


def _seconds(delta: timedelta) -> str:
    s = delta.total_seconds()
    return f"{int(s)}s" if s == int(s) else f"{s}s"


def _check(s: Schedule) -> None:
    """Every mistake a schedule can have, as a ValueError naming the schedule, at
    registration (so at start-up), not at its first tick."""
    where = f"schedule {s.name!r}"
    try:
        # The queue's own rules for the job each tick makes (and for the name, as for a kind).
        _check_name("name", s.name)
        validate(
            NewJob(
                kind=s.kind,
                payload=dict(s.payload),
                queue=s.queue,
                priority=s.priority,
                max_attempts=s.max_attempts,
            )
        )
        encode_json("payload", dict(s.payload))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if (s.cron is None) == (s.every is None):
        raise ValueError(f"{where}: give a cron expression or every=, not both or neither")
    if not isinstance(s.catch_up, timedelta) or not MIN_CATCH_UP <= s.catch_up <= MAX_CATCH_UP:
        raise ValueError(
            f"{where}: catch_up must be a timedelta from {_seconds(MIN_CATCH_UP)} to"
            f" {_seconds(MAX_CATCH_UP)}, got {s.catch_up!r}"
        )
    if s.every is not None:
        if not isinstance(s.every, timedelta) or not MIN_EVERY <= s.every <= MAX_EVERY:
            raise ValueError(
                f"{where}: every= must be a timedelta from 1s to 366 days, got {s.every!r}"
            )
        if s.tz is not None:
            raise ValueError(
                f"{where}: tz= applies to cron expressions; every= ticks are counted from the"
                " Unix epoch, in no time zone"
            )
        return
    if not isinstance(s.cron, str) or len(s.cron.split()) != 5:
        raise ValueError(
            f"{where}: invalid cron expression {s.cron!r}: it must have 5 fields"
            " (minute hour day-of-month month day-of-week); use every= for seconds"
        )
    zone: ZoneInfo | Any = UTC
    if s.tz is not None:
        try:
            zone = ZoneInfo(s.tz)
        except (ZoneInfoNotFoundError, ValueError, TypeError):
            raise ValueError(f"{where}: unknown time zone {s.tz!r} (an IANA name such as"
                             " 'Europe/Paris')") from None  # fmt: skip
    try:
        next(iter(CronSim(s.cron, datetime.now(UTC).astimezone(zone))))
    except (CronSimError, StopIteration) as exc:
        reason = str(exc) or "it names no time in the next 50 years"
        raise ValueError(f"{where}: invalid cron expression {s.cron!r}: {reason}") from None


def pass_interval(schedules: list[Schedule]) -> float:
    """Seconds between scheduler passes: 1, or less for an `every=` shorter than 2 s, so
    that a pass falls between any two ticks."""
    shortest = min((s.every.total_seconds() for s in schedules if s.every), default=math.inf)
    return min(1.0, shortest / 2)
