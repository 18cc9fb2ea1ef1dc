#!/usr/bin/env bash
# Plain enqueue, claim and complete on two revisions, in one run, alternating (bench/hotpath.py
# against each revision's own jobq, from a temporary worktree, with this checkout's
# virtualenv), then the ratios after/before of the medians.
#   bench/hotpath_ab.sh BEFORE_REV AFTER_REV [RUNS=3]     (DATABASE_URL: a server to use)
set -euo pipefail
source "$(dirname "$0")/ab_common.sh"
ab_setup hotpath-ab 3 "$@"
OUT=${OUT:-$ROOT/bench/results/hotpath-ab.jsonl}
DSN=${DATABASE_URL:?set DATABASE_URL to the server to measure on}
: > "$OUT"
run() {  # label run-number
    (cd "$ROOT" && PYTHONPATH="$TMP/$1/src:$ROOT" "$PY" -m bench.hotpath --dsn "$DSN" \
        --label "$1" --rounds 1) | tee -a "$OUT"
}
ab_alternate run
"$PY" - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"round"' in l]
keys = [k for k in rows[0] if k.endswith("_per_s")]
for k in keys:
    b = statistics.median(r[k] for r in rows if r["label"] == "before")
    a = statistics.median(r[k] for r in rows if r["label"] == "after")
    print(f"{k:28} before {b:9.1f}  after {a:9.1f}  after/before {a / b:.3f}")
PY
