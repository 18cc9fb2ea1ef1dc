"""What InternalErrorMiddleware (the 500 problem document inside the request id's middleware)
costs each request: a trivial ASGI app answering one response, called directly, bare and
wrapped, alternating rounds; the medians and their difference.

    python -m bench.error_middleware [--rounds 9] [--calls 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from jobq.api.app import InternalErrorMiddleware


async def _inner(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    pass


async def _per_call(app: Any, calls: int) -> float:
    scope = {"type": "http", "method": "GET", "path": "/healthz", "headers": []}
    started = time.perf_counter()
    for _ in range(calls):
        await app(scope, _receive, _send)
    return (time.perf_counter() - started) / calls * 1e6


async def main(rounds: int, calls: int) -> None:
    wrapped = InternalErrorMiddleware(_inner)
    bare: list[float] = []
    with_mw: list[float] = []
    for _ in range(rounds):
        bare.append(await _per_call(_inner, calls))
        with_mw.append(await _per_call(wrapped, calls))
    b, w = statistics.median(bare), statistics.median(with_mw)
    print(f"bare {b:.2f} us/request, wrapped {w:.2f} us/request: +{w - b:.2f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=100_000)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.calls))
