#!/usr/bin/env bash
# The batch and the waiters of bench/integration.py on two revisions, in one run, alternating:
# each round runs this checkout's benchmark against one revision's jobq (its `jobq api`), from
# a temporary worktree; then the medians per revision and their ratios.
#   bench/integration_ab.sh BEFORE_REV AFTER_REV [RUNS=3] [-- ARGS of bench.integration]
#   e.g. bench/integration_ab.sh main HEAD 5 -- --only batch --quick
set -euo pipefail
source "$(dirname "$0")/ab_common.sh"
ab_setup integration-ab 3 "$@"
[ ${#AB_ARGS[@]} -gt 0 ] || AB_ARGS=(--only batch,wait --quick)
OUT=${OUT:-$ROOT/bench/results/integration-ab.jsonl}
: > "$OUT"
run() {  # label round ARGS...
    local label=$1 round=$2; shift 2
    (cd "$ROOT" && PYTHONPATH="$TMP/$label/src:$ROOT" "$PY" -m bench.integration "$@" \
        --out "$TMP/run.jsonl")
    "$PY" -c 'import json, sys
for line in open(sys.argv[1]):
    print(json.dumps({"revision": sys.argv[2], "round": int(sys.argv[3]), **json.loads(line)}))
' "$TMP/run.jsonl" "$label" "$round" | tee -a "$OUT"
    rm -f "$TMP/run.jsonl"
}
ab_alternate run
"$PY" - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
def figures(r):
    if r["bench"] == "batch":
        yield f"batch, {r['connections']} connection(s): jobs/s", r["jobs_per_s"]
        for k, v in r.get("cpu_ms_per_batch", {}).items():
            yield f"batch, {r['connections']} connection(s): {k} CPU ms per batch", v
    elif r["bench"] == "wait":
        for k in ("p50", "p99", "max"):
            yield f"wait {r['mode']}: ms after finished_at, {k}", r["after_completion_ms"][k]
        if "after_statement_returned_ms" in r:
            for k in ("p50", "p99", "max"):
                yield f"wait {r['mode']}: ms after the statement returned, {k}", \
                    r["after_statement_returned_ms"][k]
seen = {}
for r in rows:
    for name, value in figures(r):
        seen.setdefault(name, {}).setdefault(r["revision"], []).append(value)
load = statistics.median(r["loadavg_1m"] for r in rows)
print(f"medians of {max(r['round'] for r in rows)} rounds, load average (1 min) median {load}")
for name, by in seen.items():
    b, a = statistics.median(by.get("before", [0])), statistics.median(by.get("after", [0]))
    ratio = f"{a / b:.3f}" if b else "-"
    print(f"{name:55} before {b:9.1f}  after {a:9.1f}  after/before {ratio}")
PY
