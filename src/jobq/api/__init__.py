"""The HTTP API: a thin translation of HTTP onto `jobq.queue`."""

from jobq.api.app import create_app

__all__ = ["create_app"]
