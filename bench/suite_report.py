"""The before/after table of the suite's drain and enqueue figures, from its JSONL output.

    python -m bench.suite_report --before A.jsonl [...] --after B.jsonl [...]

Medians over every file and round given per side, and after/before. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def load(paths: list[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in paths:
        out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out


def label(rec: dict[str, Any]) -> str | None:
    if rec.get("bench") == "drain":
        return f"drain, {rec['procs']} worker(s) x {rec['concurrency']}, jobs/s"
    if rec.get("bench") == "enqueue":
        name = f"enqueue {rec['mode']}"
        if "chunk" in rec:
            name += f" chunk={rec['chunk']}" + (" keyed" if rec.get("idempotency_keys") else "")
        name += f", {rec.get('tasks', rec.get('connections'))} task(s)/conn(s), jobs/s"
        return name
    return None


def figures(recs: list[dict[str, Any]]) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for rec in recs:
        name = label(rec)
        if name is not None and rec.get("jobs_per_s") is not None:
            values.setdefault(name, []).append(float(rec["jobs_per_s"]))
    return {k: statistics.median(v) for k, v in values.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--before", type=Path, nargs="+", required=True)
    p.add_argument("--after", type=Path, nargs="+", required=True)
    a = p.parse_args(argv)
    before, after = figures(load(a.before)), figures(load(a.after))
    print("| figure (median) | before | after | after / before |")
    print("|---|---:|---:|---:|")
    for name in sorted(before.keys() | after.keys()):
        b, f = before.get(name), after.get(name)
        ratio = f"{f / b:.3f}" if b and f else ""
        print(f"| {name} | {b if b is not None else ''} | {f if f is not None else ''} | {ratio} |")


if __name__ == "__main__":
    main()
