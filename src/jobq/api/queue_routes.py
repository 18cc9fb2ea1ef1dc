"""Queue routes: `GET /queues`, and pausing and resuming a queue or a kind."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Request
from starlette.responses import Response

from jobq.api.auth import require_token
from jobq.api.problems import COMMON_RESPONSES, openapi_problem
from jobq.api.routes import NO_CONTROL_CHARS, strict_query
from jobq.api.schemas import FlowStateOut, QueuesOut, flow_state_to_dict
from jobq.queue import MAX_NAME_LENGTH, STATUSES, FlowState, Queue

router = APIRouter(dependencies=[Depends(require_token), Depends(strict_query)], tags=["queues"])

QueueName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=NO_CONTROL_CHARS,
        description="The queue's name (1 to 255 printable characters). It need not have jobs.",
    ),
]
KindName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=NO_CONTROL_CHARS,
        description="The job kind (1 to 255 printable characters). It need not have jobs.",
    ),
]
_BAD_NAME: dict[int | str, dict[str, Any]] = {
    422: openapi_problem("The name is empty, too long or holds control characters.")
}


def _json(body: object) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _queue(request: Request) -> Queue:
    queue: Queue = request.app.state.queue
    return queue


def _state(state: FlowState) -> Response:
    return _json(flow_state_to_dict(state))


@router.get(
    "/queues",
    summary="Queues with their state and counts",
    response_model=QueuesOut,
    responses={422: openapi_problem("An unknown or repeated query parameter."), **COMMON_RESPONSES},
)
async def list_queues(request: Request) -> Response:
    """Every queue that has jobs, a pause or a limit: paused or not, its limits, and its jobs
    by status (from the count rollups: constant time). Also every kind paused or limited."""
    queue = _queue(request)
    infos = await queue.queue_infos()
    states = await queue.flow_states()
    queues = []
    for info in infos:
        counts = {s: info.counts.get(s, 0) for s in STATUSES}
        queues.append(
            {**flow_state_to_dict(info.state), "counts": counts, "total": sum(counts.values())}
        )
    kinds = [flow_state_to_dict(s) for s in states if s.scope == "kind"]
    return _json({"queues": queues, "kinds": kinds})


@router.post(
    "/queues/{name}/pause",
    summary="Pause a queue",
    response_model=FlowStateOut,
    responses={**_BAD_NAME, **COMMON_RESPONSES},
)
async def pause_queue(request: Request, name: QueueName) -> Response:
    """No worker, on any host, claims this queue's jobs once this returns (a claim that
    started before it may still finish). Running jobs finish; enqueue goes on. The pause is
    stored: it holds across restarts until resumed. A queue with no jobs yet can be paused.
    Pausing a paused queue changes nothing."""
    return _state(await _queue(request).pause("queue", name))


@router.post(
    "/queues/{name}/resume",
    summary="Resume a queue",
    response_model=FlowStateOut,
    responses={**_BAD_NAME, **COMMON_RESPONSES},
)
async def resume_queue(request: Request, name: QueueName) -> Response:
    """Workers claim this queue's jobs again. Resuming a queue that is not paused changes
    nothing."""
    return _state(await _queue(request).resume("queue", name))


@router.post(
    "/kinds/{name}/pause",
    summary="Pause a kind, in every queue",
    response_model=FlowStateOut,
    responses={**_BAD_NAME, **COMMON_RESPONSES},
)
async def pause_kind(request: Request, name: KindName) -> Response:
    """As pausing a queue, for the jobs of one kind wherever they are queued."""
    return _state(await _queue(request).pause("kind", name))


@router.post(
    "/kinds/{name}/resume",
    summary="Resume a kind",
    response_model=FlowStateOut,
    responses={**_BAD_NAME, **COMMON_RESPONSES},
)
async def resume_kind(request: Request, name: KindName) -> Response:
    return _state(await _queue(request).resume("kind", name))
