"""The OpenAPI document describes every route, status code and kind's payload."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from jobq import examples
from jobq.api import create_app
from jobq.settings import Settings

EXPECTED = {
    ("post", "/jobs"): {"200", "201", "413", "415", "422", "503"},
    ("get", "/jobs"): {"200", "422", "503"},
    ("get", "/jobs/{job_id}"): {"200", "404", "422", "503"},
    ("post", "/jobs/{job_id}/cancel"): {"200", "202", "404", "409", "422", "503"},
    ("post", "/jobs/{job_id}/retry"): {"200", "404", "409", "422", "503"},
    ("get", "/healthz"): {"200"},
    ("get", "/readyz"): {"200", "503"},
    ("get", "/metrics"): {"200"},
}


@pytest.fixture(scope="module")
async def spec() -> dict[str, Any]:
    app = create_app(Settings(), dsn="postgresql://unused", registry=examples.registry)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED))
def test_every_route_lists_its_status_codes(spec: dict[str, Any], method: str, path: str) -> None:
    responses = spec["paths"][path][method]["responses"]
    assert EXPECTED[(method, path)] <= set(responses)


def test_error_responses_are_problem_documents(spec: dict[str, Any]) -> None:
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for code, response in op["responses"].items():
                if code.startswith(("4", "5")) and (path, method) != ("/readyz", "get"):
                    assert "application/problem+json" in response["content"], (path, code)
    assert {"type", "title", "status", "detail", "error"} <= set(
        spec["components"]["schemas"]["Problem"]["properties"]
    )


def test_post_jobs_shows_each_kind_s_payload_schema(spec: dict[str, Any]) -> None:
    body = spec["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]
    variants = body["schema"]["oneOf"]
    assert len(variants) == len(examples.registry)
    schemas = spec["components"]["schemas"]
    sleep = schemas["JobCreate_sleep"]
    payload_ref = sleep["properties"]["payload"]["$ref"].rsplit("/", 1)[-1]
    assert schemas[payload_ref]["properties"]["seconds"]["minimum"] == 0
    assert "seconds" in schemas[payload_ref]["required"]


def test_list_documents_its_filters(spec: dict[str, Any]) -> None:
    params = {p["name"] for p in spec["paths"]["/jobs"]["get"]["parameters"]}
    assert {"status", "kind", "queue", "limit", "offset", "cursor"} <= params


def test_post_jobs_documents_the_idempotency_key_header(spec: dict[str, Any]) -> None:
    params = spec["paths"]["/jobs"]["post"]["parameters"]
    assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in params)


async def test_docs_pages_load_their_assets_from_the_api_not_a_cdn() -> None:
    app = create_app(Settings(), dsn="postgresql://unused", registry=examples.registry)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for page in ("/docs", "/redoc"):
            html = (await client.get(page)).text
            assert "http://" not in html and "https://" not in html, page
            for asset in re.findall(r'(?:src|href)="(/[^"]+)"', html):
                assert (await client.get(asset)).status_code == 200, asset
        swagger = (await client.get("/docs")).text
        assert "/openapi.json" in swagger


def test_the_idempotency_key_header_publishes_how_long_keys_are_remembered(
    spec: dict[str, Any],
) -> None:
    params = spec["paths"]["/jobs"]["post"]["parameters"]
    header = next(p for p in params if p["name"] == "Idempotency-Key")
    assert "JOBQ_IDEMPOTENCY_WINDOW (default 24h)" in header["description"]
