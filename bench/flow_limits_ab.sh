#!/usr/bin/env bash
# The limited drains (bench.flow --only per_key,global) on two revisions in one run,
# alternating, each revision's own code from a temporary worktree with this checkout's
# virtualenv; then each revision's medians and the ratios (python -m bench.flow_report --limits).
#   bench/flow_limits_ab.sh BEFORE_REV AFTER_REV [RUNS=3] -- [python -m bench.flow args]
# e.g. bench/flow_limits_ab.sh main flowclaim 3 -- --only per_key,global --rounds 1
set -euo pipefail
source "$(dirname "$0")/ab_common.sh"
ab_setup flow-limits-ab 3 "$@"
OUT=${OUT:-$ROOT/bench/results/flow-limits-ab}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # the runs cd into their worktrees
rm -f "$OUT"/before-*.jsonl "$OUT"/after-*.jsonl
run() {  # label run-number [bench.flow args]
    local label=$1 n=$2 tree="$TMP/$1"; shift 2
    echo "== $label ($(git -C "$tree" rev-parse --short HEAD)), run $n" >&2
    (cd "$tree" && PYTHONPATH="$tree/src:$tree" "$PY" -m bench.flow "$@" \
        --out "$OUT/$label-$n.jsonl") >&2
}
ab_alternate run
cat "$OUT"/before-*.jsonl > "$OUT/before.jsonl"; cat "$OUT"/after-*.jsonl > "$OUT/after.jsonl"
"$PY" -m bench.flow_report --limits "$OUT/before.jsonl" "$OUT/after.jsonl" | tee "$OUT/table.md"
