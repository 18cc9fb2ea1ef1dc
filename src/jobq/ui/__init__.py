"""The dashboard at /ui: server-rendered pages that read the JSON API from the browser."""

from jobq.ui.routes import install

__all__ = ["install"]
