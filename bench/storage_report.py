"""The before/after table of the storage benchmarks, from their JSONL output.

    python -m bench.storage_report --before A.jsonl [...] --after B.jsonl [...]
    python -m bench.storage_report --before A.jsonl          # one column only

Medians over every file and round given per side. Markdown on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.storage import HISTORY_PATHS


def load(paths: list[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in paths:
        out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out


def med(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def figures(recs: list[dict[str, Any]]) -> dict[str, float | None]:
    f: dict[str, float | None] = {}
    wal = [x for x in recs if x.get("bench") == "storage_wal"]
    f["WAL bytes per job (enqueue + claim + complete)"] = med([x["bytes_per_job"] for x in wal])
    f["  of which enqueue"] = med([x["enqueue_bytes_per_job"] for x in wal])
    f["  of which drain (claim + complete)"] = med([x["drain_bytes_per_job"] for x in wal])
    f["  VACUUM afterwards"] = med([x["vacuum_bytes_per_job"] for x in wal])
    hist = {x["state"]: x for x in recs if x.get("bench") == "storage_history"}
    seed = [x for x in recs if x.get("bench") == "storage_seed"]
    if seed:
        f["history seeded (finished jobs)"] = med([x["finished"] for x in seed])
        f["future-scheduled jobs"] = med([x["future"] for x in seed])
        f["seeding the finished jobs, s"] = med([x["finished_seconds"] for x in seed])
    for state in ("empty", "large"):
        h = hist.get(state)
        if h is None:
            continue
        f[f"drain jobs/s, {state}"] = h["drain_jobs_per_s"]
        for path in HISTORY_PATHS:
            f[f"GET {path} p50 ms, {state}"] = h["http"][path]["p50_ms"]
            f[f"GET {path} p99 ms, {state}"] = h["http"][path]["p99_ms"]
        f[f"total relation size MB, {state}"] = h["total_relation_mb"]
    if "ratio" in hist:
        f["drain large / empty"] = hist["ratio"]["drain_large_over_empty"]
        f["drain large / empty, interleaved rounds"] = hist["ratio"].get(
            "interleaved_drain_large_over_empty"
        )
    soak = [x for x in recs if x.get("bench") == "storage_soak"]
    if soak:
        s = soak[-1]
        f["soak: jobs/s achieved"] = s["achieved_rate"]
        f["soak: size MB, last sample"] = s["size_mb_last"]
        f["soak: plateau band (last half), min %"] = s["plateau_band_pct"][0]
        f["soak: plateau band (last half), max %"] = s["plateau_band_pct"][1]
        f["soak: claim p99 ms, first half"] = s["claim_p99_ms_first_half"]
        f["soak: claim p99 ms, second half"] = s["claim_p99_ms_second_half"]
    return f


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--before", type=Path, nargs="+", required=True)
    p.add_argument("--after", type=Path, nargs="*", default=[])
    a = p.parse_args()
    before = figures(load(a.before))
    after = figures(load(a.after)) if a.after else {}
    names = list(before) + [k for k in after if k not in before]
    if after:
        print("| figure | before | after | after / before |\n|---|---|---|---|")
        for k in names:
            b, c = before.get(k), after.get(k)
            ratio = f"{c / b:.2f}" if b and c is not None else "-"
            print(f"| {k} | {fmt(b)} | {fmt(c)} | {ratio} |")
    else:
        print("| figure | value |\n|---|---|")
        for k in names:
            print(f"| {k} | {fmt(before.get(k))} |")


if __name__ == "__main__":
    main()
