"""Settings read from the environment: bad combinations are refused with a clear message."""

from __future__ import annotations

from datetime import timedelta

import pytest

from jobq.settings import Settings, SettingsError, leaf_width


@pytest.mark.parametrize(("heartbeat", "lease"), [("30", "30"), ("45", "30"), ("5", "1")])
def test_a_heartbeat_not_shorter_than_the_lease_is_rejected(
    monkeypatch: pytest.MonkeyPatch, heartbeat: str, lease: str
) -> None:
    monkeypatch.setenv("JOBQ_HEARTBEAT_SECONDS", heartbeat)
    monkeypatch.setenv("JOBQ_LEASE_SECONDS", lease)
    with pytest.raises(SettingsError, match=r"JOBQ_HEARTBEAT_SECONDS .* less than JOBQ_LEASE"):
        Settings.from_env()


def test_a_heartbeat_shorter_than_the_lease_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_HEARTBEAT_SECONDS", "9")
    monkeypatch.setenv("JOBQ_LEASE_SECONDS", "30")
    settings = Settings.from_env()
    assert (settings.heartbeat_seconds, settings.lease_seconds) == (9, 30)


@pytest.mark.parametrize("token", ["p\u00e4sswort", "bell\x07"])
def test_an_api_token_that_no_header_can_carry_is_rejected_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    monkeypatch.setenv("JOBQ_API_TOKENS", f"fine,{token}")
    with pytest.raises(SettingsError, match="JOBQ_API_TOKENS") as caught:
        Settings.from_env()
    assert token not in str(caught.value)


def test_settings_built_in_code_refuse_a_heartbeat_not_shorter_than_the_lease() -> None:
    with pytest.raises(SettingsError, match="HEARTBEAT"):
        Settings(heartbeat_seconds=2, lease_seconds=2)


def test_a_retry_base_of_zero_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_RETRY_BASE_SECONDS", "0")
    with pytest.raises(SettingsError, match="JOBQ_RETRY_BASE_SECONDS"):
        Settings.from_env()


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "1e9"])
def test_a_wait_cap_that_is_not_a_finite_number_up_to_an_hour_is_rejected(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    # NaN passed the lower bound before and removed the cap on ?wait=.
    monkeypatch.setenv("JOBQ_WAIT_MAX_SECONDS", raw)
    with pytest.raises(SettingsError, match="JOBQ_WAIT_MAX_SECONDS"):
        Settings.from_env()


@pytest.mark.parametrize("raw", ["y", "enabled", "maybe"])
def test_a_switch_that_is_neither_on_nor_off_is_rejected(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    # It quietly meant off before.
    monkeypatch.setenv("JOBQ_PROTECT_METRICS", raw)
    with pytest.raises(SettingsError, match="JOBQ_PROTECT_METRICS"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("90s", timedelta(seconds=90)), ("15m", timedelta(minutes=15)),
     ("12h", timedelta(hours=12)), ("7d", timedelta(days=7)), (" 2M ", timedelta(minutes=2))],
)  # fmt: skip
def test_retention_takes_a_number_and_one_unit(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: timedelta
) -> None:
    monkeypatch.setenv("JOBQ_RETENTION", raw)
    assert Settings.from_env().retention == expected


def test_retention_off_keeps_history_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_RETENTION_FAILED", "off")
    settings = Settings.from_env()
    assert (settings.retention, settings.retention_failed) == (timedelta(days=7), None)


def test_retention_and_key_window_defaults_are_7_days_30_days_and_24_hours() -> None:
    settings = Settings.from_env()
    assert (settings.retention, settings.retention_failed, settings.idempotency_window) == (
        timedelta(days=7), timedelta(days=30), timedelta(hours=24),
    )  # fmt: skip


@pytest.mark.parametrize("raw", ["7", "7w", "0d", "1.5h", "-1d", "7 d", "d"])
def test_a_retention_that_is_not_a_duration_is_rejected(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("JOBQ_RETENTION", raw)
    with pytest.raises(SettingsError, match=r"JOBQ_RETENTION must be a duration such as 90s"):
        Settings.from_env()


def test_the_key_window_cannot_be_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_IDEMPOTENCY_WINDOW", "off")
    with pytest.raises(SettingsError, match=r"JOBQ_IDEMPOTENCY_WINDOW must be a duration"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("retention", "width"),
    [(None, timedelta(days=1)), (timedelta(days=7), timedelta(days=1)),
     (timedelta(days=2), timedelta(days=1)), (timedelta(days=1), timedelta(hours=1)),
     (timedelta(hours=2), timedelta(minutes=15)), (timedelta(minutes=30), timedelta(minutes=5)),
     (timedelta(minutes=10), timedelta(minutes=1)), (timedelta(minutes=2), timedelta(minutes=1)),
     (timedelta(seconds=90), timedelta(minutes=1))],
)  # fmt: skip
def test_a_leaf_is_a_day_wide_or_a_quarter_of_a_short_retention_rounded_down(
    retention: timedelta | None, width: timedelta
) -> None:
    assert leaf_width(retention) == width


def test_a_completion_creates_leaves_of_the_narrower_class_width() -> None:
    settings = Settings(retention=timedelta(minutes=2), retention_failed=timedelta(days=30))
    assert settings.history_leaf_width == timedelta(minutes=1)
