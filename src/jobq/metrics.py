"""Prometheus metrics. One definition per metric, shared by the API and the worker."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from jobq.queue import STATUSES

if TYPE_CHECKING:
    from jobq.queue import LimitUsage
    from jobq.registry import Registry

# A `*_created` series per labelled child doubles the exposition and says only when this
# process first saw the label: Prometheus' own rate() functions do not need it.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Label values that come from clients (kinds, queues, methods) are bounded: after this many
# distinct values a label reads OTHER, so no client can grow /metrics or memory without bound.
MAX_LABEL_VALUES = 100
OTHER = "other"
HTTP_METHODS = frozenset({"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"})

# Job durations span milliseconds to minutes.
_DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)  # fmt: skip

JOBS_ENQUEUED = Counter("jobq_jobs_enqueued", "Jobs created by enqueue.", ["kind"])
JOBS_FINISHED = Counter(
    "jobq_jobs_finished",
    "Attempts that ended, by outcome: succeeded, retried, failed_permanent, cancelled, rescued.",
    ["kind", "outcome"],
)
JOB_DURATION = Histogram(
    "jobq_job_duration_seconds", "Handler run time.", ["kind"], buckets=_DURATION_BUCKETS
)
JOB_QUEUE_WAIT = Histogram(
    "jobq_job_queue_wait_seconds",
    "Time from a job being due to its handler starting.",
    ["kind"],
    buckets=_DURATION_BUCKETS,
)
WORKER_IN_FLIGHT = Gauge("jobq_worker_jobs_in_flight", "Jobs this process is running now.")
WORKER_POLL_ONLY = Gauge(
    "jobq_worker_poll_only",
    "1 when this worker's LISTEN failed its self-check: it finds new jobs by polling.",
)
JOBS = Gauge("jobq_jobs", "Jobs in the database by queue and status, read at scrape time.",
             ["queue", "status"])  # fmt: skip
WAITERS = Gauge("jobq_waiters", "Requests of this API process waiting for a job (?wait=).")
# Flow control, per limited kind or queue (scope: kind or queue), read at scrape time. Never
# per concurrency key: keys are tenants, unbounded in number (GET /stats lists the busiest).
_LIMIT_LABELS = ["scope", "name"]
LIMIT_RUNNING = Gauge(
    "jobq_limit_running", "Jobs running now under a kind's or queue's limits.", _LIMIT_LABELS
)
LIMIT_MAX_CONCURRENCY = Gauge(
    "jobq_limit_max_concurrency", "The most jobs that may run at once (max_concurrency).",
    _LIMIT_LABELS,
)  # fmt: skip
LIMIT_MAX_PER_KEY = Gauge(
    "jobq_limit_max_per_key", "The most jobs of one concurrency key that may run at once.",
    _LIMIT_LABELS,
)  # fmt: skip
LIMIT_RATE = Gauge("jobq_limit_rate", "Starts allowed per second (rate_limit).", _LIMIT_LABELS)
LIMIT_TOKENS = Gauge(
    "jobq_limit_tokens", "Starts the rate limit's bucket allows now.", _LIMIT_LABELS
)
_LIMIT_GAUGES = (LIMIT_RUNNING, LIMIT_MAX_CONCURRENCY, LIMIT_MAX_PER_KEY, LIMIT_RATE, LIMIT_TOKENS)

HTTP_REQUESTS = Counter(
    "jobq_http_requests", "HTTP requests by route template.", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "jobq_http_request_duration_seconds",
    "HTTP request duration by route template.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


class _BoundedLabels:
    """The first MAX_LABEL_VALUES distinct values seen keep their name; the rest are OTHER."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) >= MAX_LABEL_VALUES:
                return OTHER
            self._seen.add(value)
            return value


_enqueued_kinds = _BoundedLabels()


def kind_label(kind: str, registry: Registry | None) -> str:
    """The `kind` label of a job enqueued over HTTP: a kind the registry knows, else OTHER.

    Without a registry any text is a kind, so only the first MAX_LABEL_VALUES get a series."""
    if registry is not None:
        return kind if kind in registry else OTHER
    return _enqueued_kinds(kind)


def method_label(method: str) -> str:
    """Clients may send any token as a method; only the standard ones get a series."""
    return method if method in HTTP_METHODS else OTHER


# Queues exported before: they read 0 once their jobs are gone instead of vanishing.
_exported_queues: dict[str, None] = {}


def set_job_counts(counts: list[tuple[str, str, int]]) -> None:
    """Replace the jobq_jobs gauge with a fresh reading from the database.

    Every status of every queue is exported, 0 included. Queues are client-chosen text: the
    MAX_LABEL_VALUES queues with the most jobs keep their name, the rest are summed as OTHER."""
    totals: dict[str, int] = {}
    for queue, _, n in counts:
        totals[queue] = totals.get(queue, 0) + n
    for queue in _exported_queues:
        totals.setdefault(queue, 0)
    ranked = sorted(totals, key=lambda q: (-totals[q], q))
    # With too many queues, OTHER takes the last of the MAX_LABEL_VALUES places.
    named = set(ranked if len(ranked) <= MAX_LABEL_VALUES else ranked[: MAX_LABEL_VALUES - 1])
    values: dict[tuple[str, str], int] = {}
    for queue in named | ({OTHER} if len(ranked) > len(named) else set()):
        for status in STATUSES:
            values[(queue, status)] = 0
    for queue, status, n in counts:
        key = (queue if queue in named else OTHER, status)
        values[key] = values.get(key, 0) + n
    _exported_queues.clear()
    _exported_queues.update(dict.fromkeys(sorted(named)))
    JOBS.clear()
    for (queue, status), n in values.items():
        JOBS.labels(queue=queue, status=status).set(n)


def set_limits(usage: list[LimitUsage]) -> None:
    """Replace the jobq_limit_* gauges with a fresh reading (`Queue.limit_usage`): one series
    per limited kind or queue, a bound only where it is set. Limits are declared in code, so
    their names are few; past MAX_LABEL_VALUES (by scope, then name) the rest are left out."""
    for gauge in _LIMIT_GAUGES:
        gauge.clear()
    for u in usage[:MAX_LABEL_VALUES]:
        labels = {"scope": u.state.scope, "name": u.state.name}
        LIMIT_RUNNING.labels(**labels).set(u.running)
        for gauge, bound in ((LIMIT_MAX_CONCURRENCY, u.state.max_concurrency),
                             (LIMIT_MAX_PER_KEY, u.state.max_per_key),
                             (LIMIT_RATE, u.state.rate), (LIMIT_TOKENS, u.tokens)):  # fmt: skip
            if bound is not None:
                gauge.labels(**labels).set(bound)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
