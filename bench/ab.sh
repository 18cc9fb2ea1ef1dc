#!/usr/bin/env bash
# The benchmark suite (bench.suite) on two revisions, in one run, alternating, each from a
# temporary worktree with this checkout's virtualenv; then the medians side by side
# (python -m bench.ab_report). For "free when unused" checks of the hot path.
#   bench/ab.sh BEFORE_REV AFTER_REV [RUNS=2] -- [python -m bench.suite args]
# e.g. bench/ab.sh main~3 main 2 -- --only drain,enqueue --procs 1
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BEFORE=${1:?before revision}; AFTER=${2:?after revision}; RUNS=${3:-2}
shift $(( $# >= 3 ? 3 : $# )); [ "${1:-}" = "--" ] && shift
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/bench/results/ab}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/jobq-ab.XXXXXX")
trap 'git -C "$ROOT" worktree remove --force "$TMP/before" 2>/dev/null || true;
      git -C "$ROOT" worktree remove --force "$TMP/after" 2>/dev/null || true; rm -rf "$TMP"' EXIT
git -C "$ROOT" worktree add --detach -q "$TMP/before" "$BEFORE"
git -C "$ROOT" worktree add --detach -q "$TMP/after" "$AFTER"
mkdir -p "$OUT"
run() {  # label run-number [bench.suite args]
    local label=$1 n=$2 tree="$TMP/$1"; shift 2
    echo "== $label ($(git -C "$tree" rev-parse --short HEAD)), run $n" >&2
    (cd "$tree" && PYTHONPATH="$tree/src:$tree" "$PY" -m bench.suite "$@" \
        --out "$OUT/$label-$n.jsonl") >/dev/null
}
for i in $(seq 1 "$RUNS"); do
    if (( i % 2 )); then run before "$i" "$@"; run after "$i" "$@"
    else run after "$i" "$@"; run before "$i" "$@"; fi
done
"$PY" -m bench.ab_report --before "$OUT"/before-*.jsonl --after "$OUT"/after-*.jsonl \
    | tee "$OUT/table.md"
