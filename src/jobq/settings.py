"""Settings read from the environment, once, with defaults that suit a laptop and production."""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path


class SettingsError(ValueError):
    """An environment variable holds a value jobq cannot use."""


def _float(
    name: str, default: float, *, minimum: float = 0.0, maximum: float | None = None
) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    # NaN passes every comparison below as false, and inf every lower bound.
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, got {raw!r}")
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be <= {maximum}, got {value}")
    return value


def _int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    # A typo ("y", "enabled") must not quietly mean off.
    raise SettingsError(f"{name} must be one of 1, true, yes, on, 0, false, no, off; got {raw!r}")


_DURATION = re.compile(r"([0-9]+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
DURATION_HINT = "a duration such as 90s, 15m, 12h or 7d"


def parse_duration(raw: str) -> timedelta:
    """`90s`, `15m`, `12h`, `7d`: a positive whole number and one unit. ValueError otherwise."""
    match = _DURATION.fullmatch(raw.strip().lower())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"expected {DURATION_HINT}, got {raw!r}")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _duration(name: str, default: timedelta) -> timedelta:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return parse_duration(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {DURATION_HINT}, got {raw!r}") from None


def idempotency_window_from_env() -> timedelta:
    """JOBQ_IDEMPOTENCY_WINDOW (default 24h), for enqueue outside a `Queue` (jobq.txn)."""
    return _duration("JOBQ_IDEMPOTENCY_WINDOW", timedelta(hours=24))


def _retention(name: str, default: timedelta) -> timedelta | None:
    """A retention setting: a duration, or `off` to keep history forever (None)."""
    raw = os.environ.get(name, "").strip()
    if raw.lower() == "off":
        return None
    try:
        return _duration(name, default)
    except SettingsError:
        raise SettingsError(f"{name} must be {DURATION_HINT}, or off, got {raw!r}") from None


# Widths a history leaf may have when retention is shorter than two days, widest first.
_SHORT_LEAF_WIDTHS = (
    timedelta(hours=1),
    timedelta(minutes=15),
    timedelta(minutes=5),
    timedelta(minutes=1),
)


def leaf_width(retention: timedelta | None) -> timedelta:
    """How much finish time one history leaf covers, for a class kept `retention` (None:
    forever). A day; with retention under two days a quarter of it, rounded down to 1 h, 15 m,
    5 m or 1 m (at least 1 m), so that history is kept for retention plus at most a quarter."""
    if retention is None or retention >= timedelta(days=2):
        return timedelta(days=1)
    quarter = retention / 4
    return next((w for w in _SHORT_LEAF_WIDTHS if w <= quarter), _SHORT_LEAF_WIDTHS[-1])


# How jobq reaches PostgreSQL: directly, or through a pooler such as PgBouncer in session or
# transaction pooling mode (see docs/deploy.md).
POOLER_MODES = ("none", "session", "transaction")


def pooler_from_env() -> str:
    raw = os.environ.get("JOBQ_POOLER", "").strip().lower() or "none"
    if raw not in POOLER_MODES:
        raise SettingsError(f"JOBQ_POOLER must be one of {', '.join(POOLER_MODES)}, got {raw!r}")
    return raw


@dataclass(frozen=True)
class Settings:
    # Database: DATABASE_URL when set, otherwise an embedded server under data_dir.
    database_url: str | None = None
    data_dir: Path = Path(".jobq")
    pool_min_size: int = 2
    # A pooler between jobq and PostgreSQL (JOBQ_POOLER): none, session or transaction.
    pooler: str = "none"
    # A direct or session-pooled URL for the worker's LISTEN, when DATABASE_URL is a
    # transaction pooler (which cannot hold a LISTEN).
    listen_database_url: str | None = None
    # A replica for the reads that tolerate lag: job lists, stats, the jobq_jobs gauge.
    read_database_url: str | None = None
    pool_max_size: int = 10
    # Retries: decorrelated jitter between base and cap.
    retry_base_seconds: float = 1.0
    retry_cap_seconds: float = 60.0
    default_max_attempts: int = 3
    # Leases: a running job belongs to its worker until lease_seconds pass without a heartbeat.
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 10.0
    rescue_interval_seconds: float = 5.0
    poll_interval_seconds: float = 1.0
    # A cancel request gets this long to be observed before the handler is cancelled hard.
    cancel_grace_seconds: float = 5.0
    # HTTP
    max_payload_bytes: int = 1024 * 1024
    # POST /jobs/batch: at most this many jobs, and this many bytes of body.
    batch_max: int = 1000
    batch_max_bytes: int = 16 * 1024 * 1024
    # Paused queues and kinds at most (JOBQ_MAX_PAUSED): any name can be paused, so what
    # clients can create (rows, and GET /queues) is bounded here.
    max_paused: int = 1000
    # GET /jobs/{id}?wait=: the longest wait a request may ask for, in seconds.
    wait_max_seconds: float = 60.0
    # The HTTP server's own limits (see jobq.api.server): slow or oversized requests and idle
    # connections cannot hold the server's memory or sockets.
    http_max_header_bytes: int = 16 * 1024
    http_header_timeout_seconds: float = 10.0
    http_body_timeout_seconds: float = 30.0
    http_keepalive_seconds: float = 5.0
    http_max_connections: int = 1000
    api_tokens: tuple[str, ...] = field(default_factory=tuple)
    protect_metrics: bool = False
    log_format: str = "auto"
    log_level: str = "INFO"
    # History: succeeded and cancelled jobs are kept `retention`, failed_permanent ones
    # `retention_failed`; None keeps them forever (JOBQ_RETENTION=off).
    retention: timedelta | None = timedelta(days=7)
    retention_failed: timedelta | None = timedelta(days=30)
    # An idempotency key is remembered at least this long after its job was created.
    idempotency_window: timedelta = timedelta(hours=24)
    # OpenTelemetry spans for enqueues and runs (JOBQ_OTEL=1; needs jobq[otel]): see jobq.otel.
    otel: bool = False

    @property
    def leaf_width_done(self) -> timedelta:
        return leaf_width(self.retention)

    @property
    def leaf_width_failed(self) -> timedelta:
        return leaf_width(self.retention_failed)

    @property
    def history_leaf_width(self) -> timedelta:
        """The width a job's completion uses when it has to create a leaf itself (the
        partitioner keeps them ahead): the narrower class's, so no leaf outlives retention by
        more than its class allows."""
        return min(self.leaf_width_done, self.leaf_width_failed)

    def __post_init__(self) -> None:
        # A bearer token travels in a header: printable ASCII, or no request can match it.
        # (The message does not show the token.)
        if any(not (t.isascii() and t.isprintable()) for t in self.api_tokens):
            raise SettingsError(
                "JOBQ_API_TOKENS: every token must be printable ASCII (it is sent in an"
                " Authorization header); one is not"
            )
        # A heartbeat must land before the lease it extends runs out, or every lease expires.
        if self.heartbeat_seconds >= self.lease_seconds:
            raise SettingsError(
                f"JOBQ_HEARTBEAT_SECONDS ({self.heartbeat_seconds:g}) must be less than "
                f"JOBQ_LEASE_SECONDS ({self.lease_seconds:g}); a third of it is the default"
            )

    @classmethod
    def from_env(cls) -> Settings:
        lease = _float("JOBQ_LEASE_SECONDS", 30.0, minimum=0.1)
        tokens = tuple(
            t.strip() for t in os.environ.get("JOBQ_API_TOKENS", "").split(",") if t.strip()
        )
        log_format = os.environ.get("JOBQ_LOG_FORMAT", "auto").strip().lower() or "auto"
        if log_format not in {"auto", "json", "text"}:
            raise SettingsError(f"JOBQ_LOG_FORMAT must be auto, json or text, got {log_format!r}")
        base = _float("JOBQ_RETRY_BASE_SECONDS", 1.0)
        if base <= 0:
            raise SettingsError(f"JOBQ_RETRY_BASE_SECONDS must be > 0, got {base}")
        cap = _float("JOBQ_RETRY_CAP_SECONDS", 60.0)
        if cap < base:
            raise SettingsError("JOBQ_RETRY_CAP_SECONDS must be >= JOBQ_RETRY_BASE_SECONDS")
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            data_dir=Path(os.environ.get("JOBQ_DATA_DIR", ".jobq")),
            pool_min_size=_int("JOBQ_POOL_MIN_SIZE", 2),
            pooler=pooler_from_env(),
            listen_database_url=os.environ.get("JOBQ_LISTEN_DATABASE_URL") or None,
            read_database_url=os.environ.get("JOBQ_READ_DATABASE_URL") or None,
            pool_max_size=_int("JOBQ_POOL_MAX_SIZE", 10, minimum=1),
            retry_base_seconds=base,
            retry_cap_seconds=cap,
            default_max_attempts=_int("JOBQ_DEFAULT_MAX_ATTEMPTS", 3, minimum=1),
            lease_seconds=lease,
            heartbeat_seconds=_float("JOBQ_HEARTBEAT_SECONDS", lease / 3, minimum=0.05),
            rescue_interval_seconds=_float("JOBQ_RESCUE_INTERVAL_SECONDS", 5.0, minimum=0.05),
            poll_interval_seconds=_float("JOBQ_POLL_INTERVAL_SECONDS", 1.0, minimum=0.01),
            cancel_grace_seconds=_float("JOBQ_CANCEL_GRACE_SECONDS", 5.0),
            max_payload_bytes=_int("JOBQ_MAX_PAYLOAD_BYTES", 1024 * 1024, minimum=1),
            batch_max=_int("JOBQ_BATCH_MAX", 1000, minimum=1),
            batch_max_bytes=_int("JOBQ_BATCH_MAX_BYTES", 16 * 1024 * 1024, minimum=1024),
            max_paused=_int("JOBQ_MAX_PAUSED", 1000, minimum=1),
            wait_max_seconds=_float("JOBQ_WAIT_MAX_SECONDS", 60.0, minimum=1.0, maximum=3600.0),
            http_max_header_bytes=_int("JOBQ_HTTP_MAX_HEADER_BYTES", 16 * 1024, minimum=1024),
            http_header_timeout_seconds=_float(
                "JOBQ_HTTP_HEADER_TIMEOUT_SECONDS", 10.0, minimum=0.05
            ),
            http_body_timeout_seconds=_float("JOBQ_HTTP_BODY_TIMEOUT_SECONDS", 30.0, minimum=0.05),
            http_keepalive_seconds=_float("JOBQ_HTTP_KEEPALIVE_SECONDS", 5.0, minimum=0.05),
            http_max_connections=_int("JOBQ_HTTP_MAX_CONNECTIONS", 1000, minimum=1),
            api_tokens=tokens,
            protect_metrics=_bool("JOBQ_PROTECT_METRICS", False),
            log_format=log_format,
            log_level=os.environ.get("JOBQ_LOG_LEVEL", "INFO").upper(),
            retention=_retention("JOBQ_RETENTION", timedelta(days=7)),
            retention_failed=_retention("JOBQ_RETENTION_FAILED", timedelta(days=30)),
            idempotency_window=_duration("JOBQ_IDEMPOTENCY_WINDOW", timedelta(hours=24)),
            otel=_otel(),
        )


def _otel() -> bool:
    on = _bool("JOBQ_OTEL", False)
    if on and importlib.util.find_spec("opentelemetry") is None:
        raise SettingsError(
            "JOBQ_OTEL=1 needs OpenTelemetry: pip install 'jobq[otel]' (or unset JOBQ_OTEL)"
        )
    return on
