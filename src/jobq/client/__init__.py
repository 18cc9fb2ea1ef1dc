"""A typed client for the jobq HTTP API, for services that only talk HTTP.

    from jobq.client import Client            # or AsyncClient

Needs only httpx (`pip install 'jobq[client]'`) and imports nothing of jobq's server side
(asyncpg, FastAPI, pydantic): `Client` and `AsyncClient` are in `_sync` and `_async`, the same
code, one awaited; what they return in `models`, what they raise in `errors`.
"""

from jobq.client import errors
from jobq.client._async import AsyncClient
from jobq.client._core import RetryPolicy
from jobq.client._sync import Client
from jobq.client.errors import (
    APIError,
    ClientError,
    InvalidRequest,
    TransportError,
    UnexpectedResponse,
)
from jobq.client.models import Cancelled, Enqueued, Job, JobError, JobSummary, NewJob, Page

__all__ = [
    "APIError",
    "AsyncClient",
    "Cancelled",
    "Client",
    "ClientError",
    "Enqueued",
    "InvalidRequest",
    "Job",
    "JobError",
    "JobSummary",
    "NewJob",
    "Page",
    "RetryPolicy",
    "TransportError",
    "UnexpectedResponse",
    "errors",
]
