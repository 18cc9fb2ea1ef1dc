"""The drain before and after, from two bench.suite result files: medians and the ratio.

python -m bench.flow_report BEFORE.jsonl AFTER.jsonl
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rates(path: str) -> list[float]:
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("bench") == "drain" and rec.get("ok") and rec.get("jobs_per_s"):
            out.append(float(rec["jobs_per_s"]))
    return out


def main() -> None:
    before, after = rates(sys.argv[1]), rates(sys.argv[2])
    mb, ma = statistics.median(before), statistics.median(after)
    print("| revision | drain runs (jobs/s) | median |")
    print("|---|---|---|")
    print(f"| before | {', '.join(f'{x:.0f}' for x in before)} | {mb:.0f} |")
    print(f"| after | {', '.join(f'{x:.0f}' for x in after)} | {ma:.0f} |")
    print(f"\nafter / before: {ma / mb:.3f}")


if __name__ == "__main__":
    main()
