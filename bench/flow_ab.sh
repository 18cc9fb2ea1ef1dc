#!/usr/bin/env bash
# "Free when unused": the drain (bench.suite --only drain) on two revisions in one run,
# alternating, each revision's own code from a temporary worktree with this checkout's
# virtualenv; then each revision's median and the ratio (python -m bench.flow_report).
#   bench/flow_ab.sh BEFORE_REV AFTER_REV [RUNS=6] -- [python -m bench.suite args]
# e.g. bench/flow_ab.sh main flow 6 -- --procs 2 --n 20000 --rounds 1
set -euo pipefail
source "$(dirname "$0")/ab_common.sh"
ab_setup flow-ab 6 "$@"
OUT=${OUT:-$ROOT/bench/results/flow-ab}
mkdir -p "$OUT"
rm -f "$OUT"/before-*.jsonl "$OUT"/after-*.jsonl
run() {  # label run-number [bench.suite args]
    local label=$1 n=$2 tree="$TMP/$1"; shift 2
    echo "== $label ($(git -C "$tree" rev-parse --short HEAD)), run $n" >&2
    (cd "$tree" && PYTHONPATH="$tree/src:$tree" "$PY" -m bench.suite --only drain "$@" \
        --out "$OUT/$label-$n.jsonl") >&2
}
ab_alternate run
cat "$OUT"/before-*.jsonl > "$OUT/before.jsonl"; cat "$OUT"/after-*.jsonl > "$OUT/after.jsonl"
"$PY" -m bench.flow_report "$OUT/before.jsonl" "$OUT/after.jsonl" | tee "$OUT/table.md"
