"""Settings read from the environment: bad combinations are refused with a clear message."""

from __future__ import annotations

import pytest

from jobq.settings import Settings, SettingsError


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


def test_settings_built_in_code_refuse_a_heartbeat_not_shorter_than_the_lease() -> None:
    with pytest.raises(SettingsError, match="HEARTBEAT"):
        Settings(heartbeat_seconds=2, lease_seconds=2)


def test_a_retry_base_of_zero_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_RETRY_BASE_SECONDS", "0")
    with pytest.raises(SettingsError, match="JOBQ_RETRY_BASE_SECONDS"):
        Settings.from_env()
