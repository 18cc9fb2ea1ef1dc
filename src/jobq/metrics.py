"""Prometheus metrics. One definition per metric, shared by the API and the worker."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

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
JOBS = Gauge("jobq_jobs", "Jobs in the database by queue and status, read at scrape time.",
             ["queue", "status"])  # fmt: skip
HTTP_REQUESTS = Counter(
    "jobq_http_requests", "HTTP requests by route template.", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "jobq_http_request_duration_seconds",
    "HTTP request duration by route template.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def set_job_counts(counts: list[tuple[str, str, int]]) -> None:
    """Replace the jobq_jobs gauge with a fresh reading from the database."""
    JOBS.clear()
    for queue, status, n in counts:
        JOBS.labels(queue=queue, status=status).set(n)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
