"""Bearer-token authentication (JOBQ_API_TOKENS) and what stays open."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from jobq import cli
from jobq.api import auth, create_app
from jobq.settings import Settings

TOKENS = ("s3cret-token-alpha", "s3cret-token-beta")
JOB = "01900000-0000-7000-8000-000000000000"
JOB_ROUTES = [
    ("GET", "/jobs"),
    ("POST", "/jobs"),
    ("GET", f"/jobs/{JOB}"),
    ("POST", f"/jobs/{JOB}/cancel"),
    ("POST", f"/jobs/{JOB}/retry"),
    ("GET", "/stats"),
]


def _client(pool: asyncpg.Pool, settings: Settings) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(settings, pool=pool))
    return httpx.AsyncClient(transport=transport, base_url="http://jobq.test")


@pytest.fixture
async def client(pool: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(pool, Settings(api_tokens=TOKENS)) as c:
        yield c


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["error"] == "unauthorized"


@pytest.mark.parametrize(("method", "path"), JOB_ROUTES)
async def test_job_routes_without_a_token_are_401_with_a_bearer_challenge(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    _assert_401(await client.request(method, path, json={"kind": "echo"}))


@pytest.mark.parametrize(("method", "path"), JOB_ROUTES)
async def test_job_routes_with_a_wrong_token_are_401(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(
        method, path, json={"kind": "echo"}, headers=_bearer("not-the-token")
    )
    _assert_401(response)


@pytest.mark.parametrize(
    "authorization",
    [
        f"Basic {TOKENS[0]}",
        TOKENS[0],
        "Bearer",
        "Bearer ",
        f"Bearer {TOKENS[0]}x",
        f"Bearer {TOKENS[0][:-1]}",
    ],
)
async def test_malformed_or_near_miss_credentials_are_401(
    client: httpx.AsyncClient, authorization: str
) -> None:
    _assert_401(await client.get("/jobs", headers={"Authorization": authorization}))


@pytest.mark.parametrize("token", TOKENS)
async def test_each_configured_token_is_accepted(client: httpx.AsyncClient, token: str) -> None:
    assert (await client.get("/jobs", headers=_bearer(token))).status_code == 200


async def test_an_accepted_token_reaches_the_route(client: httpx.AsyncClient) -> None:
    created = await client.post("/jobs", json={"kind": "echo"}, headers=_bearer(TOKENS[1]))
    assert created.status_code == 201


async def test_authentication_comes_before_body_validation(client: httpx.AsyncClient) -> None:
    response = await client.post("/jobs", content=b"not json", headers={"content-type": "x/y"})
    _assert_401(response)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_endpoints_stay_open_when_auth_is_on(
    client: httpx.AsyncClient, path: str
) -> None:
    assert (await client.get(path)).status_code == 200


async def test_metrics_are_open_by_default_when_auth_is_on(client: httpx.AsyncClient) -> None:
    assert (await client.get("/metrics")).status_code == 200


async def test_metrics_can_be_protected(pool: asyncpg.Pool) -> None:
    settings = Settings(api_tokens=TOKENS, protect_metrics=True)
    async with _client(pool, settings) as c:
        _assert_401(await c.get("/metrics"))
        assert (await c.get("/metrics", headers=_bearer(TOKENS[0]))).status_code == 200


async def test_without_tokens_the_api_is_open(pool: asyncpg.Pool) -> None:
    async with _client(pool, Settings()) as c:
        assert (await c.get("/jobs")).status_code == 200


def test_settings_read_comma_separated_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBQ_API_TOKENS", " one, two ,,three ")
    assert Settings.from_env().api_tokens == ("one", "two", "three")


def test_every_configured_token_is_compared_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    # Even when the first token matches, the others are compared too: no early exit.
    assert auth.is_allowed(TOKENS[0], TOKENS)
    assert [b for _, b in calls] == [t.encode() for t in TOKENS]


async def test_tokens_never_appear_in_logs_or_responses(
    pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-token-zeta"
    with caplog.at_level(logging.DEBUG):
        async with _client(pool, Settings(api_tokens=TOKENS)) as c:
            bodies = [
                (await c.get("/jobs", headers=_bearer(wrong))).text,
                (await c.get("/jobs", headers=_bearer(TOKENS[0]))).text,
                (await c.post("/jobs", json={"kind": "x"}, headers=_bearer(wrong))).text,
            ]
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for secret in (*TOKENS, wrong):
        assert secret not in logged
        assert all(secret not in body for body in bodies)


def test_an_open_api_on_a_non_loopback_address_warns_at_start_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="jobq.cli"):
        cli._warn_open(Settings(), "0.0.0.0")
    assert any("JOBQ_API_TOKENS" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("settings", "host"),
    [
        (Settings(), "127.0.0.1"),
        (Settings(), "localhost"),
        (Settings(api_tokens=TOKENS), "0.0.0.0"),
    ],
)
def test_no_start_up_warning_on_loopback_or_with_tokens(
    caplog: pytest.LogCaptureFixture, settings: Settings, host: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="jobq.cli"):
        cli._warn_open(settings, host)
    assert not caplog.records
