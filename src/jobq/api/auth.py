"""Bearer-token authentication, on when JOBQ_API_TOKENS is set."""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection

from jobq.api.problems import ProblemError


def token_from(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def is_allowed(token: str | None, tokens: tuple[str, ...]) -> bool:
    if token is None:
        return False
    supplied = token.encode()
    # Compare against every configured token, without short-circuiting, in constant time.
    found = False
    for candidate in tokens:
        found |= hmac.compare_digest(supplied, candidate.encode())
    return found


async def require_token(conn: HTTPConnection) -> None:
    """FastAPI dependency: passes when auth is off or the bearer token is known.

    Async on purpose: FastAPI runs a sync dependency in a thread pool, once per request."""
    tokens: tuple[str, ...] = conn.app.state.settings.api_tokens
    if not tokens:
        return
    token = token_from(conn)
    if not is_allowed(token, tokens):
        raise ProblemError(
            401,
            "unauthorized",
            "missing bearer token" if token is None else "invalid bearer token",
            headers={"WWW-Authenticate": 'Bearer realm="jobq"'},
        )
