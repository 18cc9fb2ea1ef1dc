"""`GET /stats`: the overview behind the dashboard and `jobq status`."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from jobq import stats
from jobq.api.auth import require_token
from jobq.api.problems import COMMON_RESPONSES, openapi_problem
from jobq.api.routes import strict_query
from jobq.api.schemas import StatsOut

router = APIRouter(dependencies=[Depends(require_token), Depends(strict_query)], tags=["stats"])


@router.get(
    "/stats",
    summary="Counts, lag, throughput and failures at a glance",
    response_model=StatsOut,
    responses={422: openapi_problem("An unknown or repeated query parameter."), **COMMON_RESPONSES},
)
async def get_stats(request: Request) -> Response:
    """Counts by queue and status, the oldest due job's age per queue, jobs finished per
    minute over the last 15 minutes, the kinds failing most, waiting jobs no live worker
    handles, and the live workers."""
    # Lag-tolerant: from the read replica (JOBQ_READ_DATABASE_URL) when there is one.
    body = await stats.collect(request.app.state.read_queue)
    return Response(orjson.dumps(body), media_type="application/json")
