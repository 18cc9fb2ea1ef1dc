"""Draws bench/results/benchmarks.png from the suite's and the peers harness's JSON lines.

python -m bench.chart [--suite bench/results/suite.jsonl] [--peers bench/results/peers.jsonl]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def load(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peer_medians(recs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """label -> metric -> median over ok runs (synchronous_commit=on only)."""
    vals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for x in recs:
        if not x.get("ok") or x.get("sync_commit", "on") != "on":
            continue
        label = x.get("label", x["system"])
        for key in ("jobs_per_s", "p50_ms", "p95_ms", "p99_ms"):
            if x.get(key) is not None:
                vals[label][f"{x['test']}.{key}"].append(float(x[key]))
    return {s: {k: statistics.median(v) for k, v in m.items()} for s, m in vals.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--suite", type=Path, default=RESULTS / "suite.jsonl")
    p.add_argument("--peers", type=Path, default=RESULTS / "peers.jsonl")
    p.add_argument("--out", type=Path, default=RESULTS / "benchmarks.png")
    a = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite = load(a.suite)
    peers = peer_medians(load(a.peers))
    systems = sorted(peers, key=lambda s: (s != "jobq", s))
    colors = {"jobq": "#2b7bba", "pgqueuer": "#e08a2c", "procrastinate": "#6aa84f"}

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    fig.suptitle("jobq benchmarks (2 cores, PostgreSQL, fsync and synchronous_commit on)")

    def bars(ax: Any, names: list[str], values: list[float], title: str, unit: str) -> None:
        cs = [colors.get(n, "#888888") for n in names]
        ax.bar(names, values, color=cs)
        for i, v in enumerate(values):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.1f}", (i, v), ha="center", va="bottom")
        ax.set_title(title)
        ax.set_ylabel(unit)

    if peers:
        bars(axes[0][0], systems, [peers[s].get("drain.jobs_per_s", 0.0) for s in systems],
             "drain, 20k no-op jobs (peers harness, median)", "jobs/s")  # fmt: skip
        bars(axes[0][1], systems, [peers[s].get("enqueue.jobs_per_s", 0.0) for s in systems],
             "bulk enqueue, 20k jobs (peers harness, median)", "jobs/s")  # fmt: skip
        ax = axes[1][0]
        width = 0.38
        xs = list(range(len(systems)))
        p50 = [peers[s].get("latency.p50_ms", 0.0) for s in systems]
        p99 = [peers[s].get("latency.p99_ms", 0.0) for s in systems]
        ax.bar([x - width / 2 for x in xs], p50, width, label="p50", color="#7fb3d5")
        ax.bar([x + width / 2 for x in xs], p99, width, label="p99", color="#1f4e79")
        ax.set_xticks(xs, systems)
        ax.set_title("enqueue-to-handler-start latency at 100 jobs/s")
        ax.set_ylabel("ms")
        ax.legend()
    else:
        for ax in (axes[0][0], axes[0][1], axes[1][0]):
            ax.text(0.5, 0.5, "no peers results (make bench-peers)", ha="center")

    ax = axes[1][1]
    scale = {x["table"]: x for x in suite if x.get("bench") == "scale" and x["table"] != "ratio"}
    mem = [x for x in suite if x.get("bench") == "memory"]
    names: list[str] = []
    values: list[float] = []
    if "empty" in scale and "large" in scale:
        names += ["drain:\nempty", "drain:\n1.1M rows"]
        values += [scale["empty"]["jobs_per_s"], scale["large"]["jobs_per_s"]]
    ax.bar(names, values, color="#2b7bba")
    for i, v in enumerate(values):
        ax.annotate(f"{v:,.0f}", (i, v), ha="center", va="bottom")
    ax.set_ylabel("jobs/s (jobq suite)")
    ax.set_title("jobq: table size and worker memory")
    if mem:
        ax2 = ax.twinx()
        off = len(names)
        labels = [f"RSS\nc={x['concurrency']}" for x in mem]
        ax2.bar(range(off, off + len(mem)), [x["rss_mb"] for x in mem], color="#b4a7d6")
        for i, x in enumerate(mem):
            ax2.annotate(f"{x['rss_mb']:.0f} MB", (off + i, x["rss_mb"]), ha="center", va="bottom")
        ax2.set_ylabel("worker RSS, MB")
        ax.set_xticks(range(off + len(mem)), names + labels)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"chart -> {a.out}")


if __name__ == "__main__":
    main()
