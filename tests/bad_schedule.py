"""A registry whose schedule has a bad cron expression: `jobq worker` must refuse it at
start-up (tests/test_periodic.py)."""

from jobq.registry import Registry

registry = Registry()
registry.periodic("61 * * * *", kind="report.daily")
