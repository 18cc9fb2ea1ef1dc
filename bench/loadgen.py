"""A small HTTP/1.1 load generator for `POST /jobs`: keep-alive connections, each sending
one request at a time, for a fixed duration. Raw asyncio streams keep its own CPU use low,
which matters when it shares two cores with the API and PostgreSQL.

Prints one JSON line: requests/s and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import orjson


async def client(
    host: str, port: int, until: float, lat: list[float], errors: list[str], path: str
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    try:
        while time.monotonic() < until:
            body = orjson.dumps({"kind": "http", "payload": {"i": i}})
            i += 1
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            t = time.monotonic()
            writer.write(head + body)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            lat.append(time.monotonic() - t)
            if not status_line.startswith(b"HTTP/1.1 201"):
                errors.append(status_line.decode(errors="replace").strip())
    finally:
        writer.close()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def main(a: argparse.Namespace) -> None:
    lat: list[float] = []
    errors: list[str] = []
    start = time.monotonic()
    until = start + a.seconds
    await asyncio.gather(
        *(client(a.host, a.port, until, lat, errors, a.path) for _ in range(a.connections))
    )
    dt = time.monotonic() - start
    print(
        json.dumps(
            {
                "connections": a.connections,
                "n": len(lat),
                "seconds": round(dt, 3),
                "jobs_per_s": round(len(lat) / dt, 1),
                "p50_ms": round(pct(lat, 50) * 1000, 2),
                "p99_ms": round(pct(lat, 99) * 1000, 2),
                "errors": len(errors),
                "first_error": errors[0] if errors else None,
                "ok": not errors,
            }
        )
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/jobs")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.run(main(args))
    except ImportError:
        asyncio.run(main(args))
