#!/usr/bin/env bash
# "Free when unused": the drain (bench.suite --only drain) on two revisions in one run,
# alternating, each revision's own code from a temporary worktree with this checkout's
# virtualenv; then each revision's median and the ratio (python -m bench.flow_report).
#   bench/flow_ab.sh BEFORE_REV AFTER_REV [RUNS=6] -- [python -m bench.suite args]
# e.g. bench/flow_ab.sh main flow 6 -- --procs 2 --n 20000 --rounds 1
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BEFORE=${1:?before revision}; AFTER=${2:?after revision}; RUNS=${3:-6}
shift $(( $# >= 3 ? 3 : $# )); [ "${1:-}" = "--" ] && shift
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/bench/results/flow-ab}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/jobq-flow-ab.XXXXXX")
trap 'git -C "$ROOT" worktree remove --force "$TMP/before" 2>/dev/null || true;
      git -C "$ROOT" worktree remove --force "$TMP/after" 2>/dev/null || true; rm -rf "$TMP"' EXIT
git -C "$ROOT" worktree add --detach -q "$TMP/before" "$BEFORE"
git -C "$ROOT" worktree add --detach -q "$TMP/after" "$AFTER"
mkdir -p "$OUT"
rm -f "$OUT"/before-*.jsonl "$OUT"/after-*.jsonl
run() {  # label run-number [bench.suite args]
    local label=$1 n=$2 tree="$TMP/$1"; shift 2
    echo "== $label ($(git -C "$tree" rev-parse --short HEAD)), run $n" >&2
    (cd "$tree" && PYTHONPATH="$tree/src:$tree" "$PY" -m bench.suite --only drain "$@" \
        --out "$OUT/$label-$n.jsonl") >&2
}
for i in $(seq 1 "$RUNS"); do
    if (( i % 2 )); then run before "$i" "$@"; run after "$i" "$@"
    else run after "$i" "$@"; run before "$i" "$@"; fi
done
cat "$OUT"/before-*.jsonl > "$OUT/before.jsonl"; cat "$OUT"/after-*.jsonl > "$OUT/after.jsonl"
"$PY" -m bench.flow_report "$OUT/before.jsonl" "$OUT/after.jsonl" | tee "$OUT/table.md"
