"""What the Python A/B benchmarks share: two revisions checked out side by side, samples of
each taken in a process of that revision's own code, alternating (ABBA) against one embedded
PostgreSQL, and medians with after/before. bench/ab_common.sh does the same for the shell
scripts.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

Results = dict[str, list[dict[str, Any]]]


def run_in_tree(tree: Path, script: str, args: Sequence[str]) -> dict[str, Any]:
    """`script` (a path: the older revision may not have it) run over `tree`'s jobq; the JSON
    object its last line prints."""
    out = subprocess.run(
        [sys.executable, script, *args],
        cwd=tree, env={**os.environ, "PYTHONPATH": f"{tree / 'src'}:{tree}"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def alternate(
    before: str,
    after: str,
    rounds: int,
    out: Path,
    sample: Callable[[str, Path, str], dict[str, Any]],
) -> Results:
    """`sample(label, tree, admin_dsn)` `rounds` times per revision, the order flipping every
    round; each record is appended to `out` as a JSON line as it comes."""
    from bench.suite import BENCH_PG_SETTINGS, server

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")
    results: Results = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="jobq-ab-") as tmp:
        trees = {}
        for label, rev in (("before", before), ("after", after)):
            trees[label] = Path(tmp) / label
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                            str(trees[label]), rev], check=True)  # fmt: skip
        try:
            with server(BENCH_PG_SETTINGS) as admin:
                for i in range(rounds):
                    order = ("before", "after") if i % 2 == 0 else ("after", "before")
                    for label in order:
                        rec = {"revision": label, "round": i,
                               **sample(label, trees[label], admin)}  # fmt: skip
                        results[label].append(rec)
                        with out.open("a") as f:
                            f.write(json.dumps(rec) + "\n")
                        print(json.dumps(rec), file=sys.stderr, flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False)  # fmt: skip
    return results


def report(results: Results, rounds: int, rows: Sequence[tuple[str, str]]) -> None:
    """A Markdown table: per (key, title), the medians and after/before."""
    print(f"| median of {rounds} samples, jobs/s | before | after | after / before |")
    print("|---|---:|---:|---:|")
    for key, title in rows:
        b = statistics.median(r[key] for r in results["before"])
        f = statistics.median(r[key] for r in results["after"])
        print(f"| {title} | {b:.0f} | {f:.0f} | {f / b:.3f} |")
