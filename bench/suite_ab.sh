#!/usr/bin/env bash
# The suite's drain and enqueue benchmarks on two revisions, in one run, alternating: each
# revision's own code from a temporary worktree, with this checkout's virtualenv. Then the
# before/after table of medians and ratios (python -m bench.suite_report).
#   bench/suite_ab.sh BEFORE_REV AFTER_REV [RUNS=3] -- [python -m bench.suite args]
# e.g. bench/suite_ab.sh main hooks 3 -- --only drain,enqueue --procs 1 --rounds 1
set -euo pipefail
source "$(dirname "$0")/ab_common.sh"
ab_setup suite-ab 3 "$@"
OUT=${OUT:-$ROOT/bench/results/suite-ab}
mkdir -p "$OUT"
rm -f "$OUT"/before-*.jsonl "$OUT"/after-*.jsonl
run() {  # label run-number [bench.suite args]
    local label=$1 n=$2 tree="$TMP/$1"; shift 2
    echo "== $label ($(git -C "$tree" rev-parse --short HEAD)), run $n" >&2
    (cd "$tree" && PYTHONPATH="$tree/src:$tree" "$PY" -m bench.suite "$@" \
        --out "$OUT/$label-$n.jsonl") >/dev/null
}
ab_alternate run
"$PY" -m bench.suite_report --before "$OUT"/before-*.jsonl --after "$OUT"/after-*.jsonl \
    | tee "$OUT/table.md"
