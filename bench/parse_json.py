"""The strict JSON reader of POST /jobs (jobq.wire) against plain orjson, same run, interleaved.

python -m bench.parse_json
"""

from __future__ import annotations

import timeit

import orjson

from jobq import wire


def main() -> None:
    small = orjson.dumps({"kind": "http", "payload": {"i": 12345}})
    rows = [{"id": i, "name": f"row {i}", "score": i / 7, "tags": ["a", "b"]} for i in range(10000)]
    big = orjson.dumps({"kind": "echo", "payload": {"rows": rows}})
    for name, data, n in (("small", small, 20000), ("large", big, 5)):
        for rnd in range(3):
            o = min(timeit.repeat(lambda d=data: orjson.loads(d), number=n, repeat=5)) / n
            w = min(timeit.repeat(lambda d=data: wire.loads(d), number=n, repeat=5)) / n
            print(
                f"{name} ({len(data)} bytes) round {rnd}: orjson {o * 1e6:.1f} us,"
                f" wire {w * 1e6:.1f} us (+{(w - o) * 1e6:.1f} us)"
            )


if __name__ == "__main__":
    main()
