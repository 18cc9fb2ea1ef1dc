"""Dashboard pages. They carry no job data: the page's script reads the JSON API with the
operator's bearer token (kept in the tab's session storage), so the pages themselves need no
authentication and the API's auth covers everything the dashboard shows or does."""

from __future__ import annotations

import uuid
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from jobq.queue import STATUSES, TERMINAL_STATUSES

_HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(_HERE / "templates"))

# Pages load only their own script and style sheet: data shown on them cannot run as code.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix="/ui", include_in_schema=False)


def _page(
    request: Request, template: str, page: str, status_code: int = 200, **context: object
) -> Response:
    registry = request.app.state.registry
    response = templates.TemplateResponse(
        request,
        template,
        status_code=status_code,
        context={
            "page": page,
            "statuses": STATUSES,
            "terminal_statuses": TERMINAL_STATUSES,
            "kinds": list(registry.kinds) if registry is not None else [],
            "auth_on": bool(request.app.state.settings.api_tokens),
            **context,
        },
    )
    response.headers.update(_SECURITY_HEADERS)
    return response


@router.get("")
async def overview(request: Request) -> Response:
    return _page(request, "overview.html", "overview")


@router.get("/jobs")
async def jobs(request: Request) -> Response:
    return _page(request, "jobs.html", "jobs")


@router.get("/jobs/{job_id}")
async def job(request: Request, job_id: str) -> Response:
    # A malformed id names no job: 404 here. A well-formed one is looked up by the page's
    # script with the operator's token (pages carry no data, so they need no auth).
    try:
        uuid.UUID(job_id)
    except ValueError:
        return _page(
            request, "not_found.html", "missing", 404, message=f"{job_id!r} is not a job id."
        )
    return _page(request, "job.html", "job", job_id=job_id)


def install(app: FastAPI) -> None:
    """Serve the dashboard at /ui (and send / there)."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=str(_HERE / "static")), name="ui-static")

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/ui", status_code=307)
