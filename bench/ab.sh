#!/usr/bin/env bash
# The benchmark suite (bench.suite) on two revisions, in one run, alternating, each from a
# temporary worktree with this checkout's virtualenv; then the medians side by side
# (python -m bench.ab_report). For "free when unused" checks of the hot path.
#   bench/ab.sh BEFORE_REV AFTER_REV [RUNS=2] -- [python -m bench.suite args]
# e.g. bench/ab.sh main~3 main 2 -- --only drain,enqueue --procs 1
set -euo pipefail
source "$(dirname "$0")/ab_common.sh"
ab_setup ab 2 "$@"
OUT=${OUT:-$ROOT/bench/results/ab}
mkdir -p "$OUT"
rm -f "$OUT"/before-*.jsonl "$OUT"/after-*.jsonl
run() {  # label run-number [bench.suite args]
    local label=$1 n=$2 tree="$TMP/$1"; shift 2
    echo "== $label ($(git -C "$tree" rev-parse --short HEAD)), run $n" >&2
    (cd "$tree" && PYTHONPATH="$tree/src:$tree" "$PY" -m bench.suite "$@" \
        --out "$OUT/$label-$n.jsonl") >/dev/null
}
ab_alternate run
"$PY" -m bench.ab_report --before "$OUT"/before-*.jsonl --after "$OUT"/after-*.jsonl \
    | tee "$OUT/table.md"
