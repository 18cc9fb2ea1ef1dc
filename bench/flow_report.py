"""Two revisions' results, medians and ratios.

python -m bench.flow_report BEFORE.jsonl AFTER.jsonl            the drain (bench.suite files)
python -m bench.flow_report --limits BEFORE.jsonl AFTER.jsonl   the limited drains (bench.flow)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def records(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rates(path: str) -> list[float]:
    out = []
    for rec in records(path):
        if rec.get("bench") == "drain" and rec.get("ok") and rec.get("jobs_per_s"):
            out.append(float(rec["jobs_per_s"]))
    return out


def drain(before_path: str, after_path: str) -> None:
    before, after = rates(before_path), rates(after_path)
    mb, ma = statistics.median(before), statistics.median(after)
    print("| revision | drain runs (jobs/s) | median |")
    print("|---|---|---|")
    print(f"| before | {', '.join(f'{x:.0f}' for x in before)} | {mb:.0f} |")
    print(f"| after | {', '.join(f'{x:.0f}' for x in after)} | {ma:.0f} |")
    print(f"\nafter / before: {ma / mb:.3f}")


# (bench, field, what it is), each reported per revision as its runs and their median.
LIMIT_FIELDS = [
    ("flow_per_key", "per_key_jobs_per_s", "per-key drain, jobs/s"),
    ("flow_per_key", "unlimited_jobs_per_s", "unlimited drain, jobs/s"),
    ("flow_per_key", "ratio", "per-key / unlimited"),
    ("flow_per_key", "most_per_key_at_once", "most of one key at once"),
    ("flow_global", "jobs_per_s", "global limit 20, jobs/s"),
    ("flow_global", "of_ideal", "global limit 20, of 400/s"),
    ("flow_global", "most_at_once", "global limit 20, most at once"),
]


def limits(before_path: str, after_path: str) -> None:
    before, after = records(before_path), records(after_path)
    print("| measure | before (runs) | median | after (runs) | median | after / before |")
    print("|---|---|---|---|---|---|")
    for bench, field, label in LIMIT_FIELDS:
        b = [float(r[field]) for r in before if r.get("bench") == bench and field in r]
        a = [float(r[field]) for r in after if r.get("bench") == bench and field in r]
        if not b or not a:
            continue
        mb, ma = statistics.median(b), statistics.median(a)
        ratio = f"{ma / mb:.3f}" if mb else "-"
        print(f"| {label} | {', '.join(f'{x:g}' for x in b)} | {mb:g} "
              f"| {', '.join(f'{x:g}' for x in a)} | {ma:g} | {ratio} |")  # fmt: skip


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--limits":
        limits(args[1], args[2])
    else:
        drain(args[0], args[1])


if __name__ == "__main__":
    main()
