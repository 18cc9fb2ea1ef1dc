"""The medians of two sets of bench.suite results side by side (bench/ab.sh)."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def _label(rec: dict[str, Any]) -> str | None:
    if rec.get("bench") == "drain":
        return f"drain, {rec['procs']} proc x {rec['concurrency']}"
    if rec.get("bench") == "enqueue":
        extra = f", chunk {rec['chunk']}" if "chunk" in rec else ""
        keyed = ", keyed" if rec.get("idempotency_keys") else ""
        return f"enqueue {rec['mode']}{extra}{keyed}"
    return None


def medians(paths: list[Path]) -> dict[str, tuple[float, int]]:
    found: dict[str, list[float]] = defaultdict(list)
    for path in paths:
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            label = _label(rec)
            if label and rec.get("jobs_per_s"):
                found[label].append(float(rec["jobs_per_s"]))
    return {k: (statistics.median(v), len(v)) for k, v in found.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--before", nargs="+", type=Path, required=True)
    p.add_argument("--after", nargs="+", type=Path, required=True)
    a = p.parse_args()
    before, after = medians(a.before), medians(a.after)
    print("| measurement | before jobs/s (median, n) | after jobs/s (median, n) | after/before |")
    print("|---|---|---|---|")
    for label in sorted(before.keys() & after.keys()):
        (b, nb), (f, nf) = before[label], after[label]
        print(f"| {label} | {b:,.0f} ({nb}) | {f:,.0f} ({nf}) | {f / b:.3f} |")


if __name__ == "__main__":
    main()
