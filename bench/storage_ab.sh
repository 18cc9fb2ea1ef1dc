#!/usr/bin/env bash
# The storage benchmarks on two revisions, in one run, alternating: each revision's own code
# (bench/store.py knows its schema) from a temporary worktree, with this checkout's
# virtualenv. Then the before/after table (python -m bench.storage_report).
#   bench/storage_ab.sh BEFORE_REV AFTER_REV [RUNS=1] -- [python -m bench.storage args]
# e.g. bench/storage_ab.sh storage-before main 1 -- --only wal,history --finished 1000000
set -euo pipefail
source "$(dirname "$0")/ab_common.sh"
ab_setup storage-ab 1 "$@"
OUT=${OUT:-$ROOT/bench/results/storage-ab}
mkdir -p "$OUT"
run() {  # label run-number [bench.storage args]
    local label=$1 n=$2 tree="$TMP/$1"; shift 2
    echo "== $label ($(git -C "$tree" rev-parse --short HEAD)), run $n" >&2
    (cd "$tree" && PYTHONPATH="$tree/src:$tree" "$PY" -m bench.storage "$@" \
        --out "$OUT/$label-$n.jsonl" --soak-out "$OUT/$label-$n-soak.jsonl" \
        --soak-plot "$OUT/$label-$n-soak.png") >&2  # stdout: the table only
    for f in "$tree"/bench/results/storage-explain-{empty,large}.txt; do  # the tree goes at exit
        if [ -e "$f" ]; then cp "$f" "$OUT/$label-$n-$(basename "$f")"; fi
    done
}
ab_alternate run
"$PY" -m bench.storage_report --before "$OUT"/before-*.jsonl --after "$OUT"/after-*.jsonl \
    | tee "$OUT/table.md"
