#!/usr/bin/env bash
# jobq side by side with PgQueuer and procrastinate through the peers harness
# (../shared/peers by default; PEERS_DIR overrides). Same PostgreSQL 15 (pg.sh), same
# workload, alternating systems, medians of RUNS rounds (PEERS_N jobs, default 20000). Raw lines go to
# bench/results/peers.jsonl, the median table to bench/results/peers-table.txt.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS_DIR:-$ROOT/../shared/peers}
RUNS=${RUNS:-3}
SYSTEMS=${SYSTEMS:-"jobq pgqueuer procrastinate"}
[ -x "$PEERS/run_all.sh" ] || { echo "no peers harness at $PEERS (set PEERS_DIR)" >&2; exit 2; }
for s in $SYSTEMS; do
    [ "$s" = jobq ] && continue
    [ -x "${PEERS_ROOT:-/tmp/peers}/venv-$s/bin/python" ] || "$PEERS/setup.sh" "$s"
done
JOBQ_SPEC="$ROOT" "$PEERS/setup.sh" jobq
out=$(PEERS_BENCH_jobq="$ROOT/bench/peers_jobq.py" "$PEERS/run_all.sh" --runs "$RUNS" \
    --systems "$SYSTEMS" ${PEERS_N:+--n "$PEERS_N"} | tee /dev/stderr)
raw=$(printf '%s\n' "$out" | sed -n 's/^raw: //p' | tail -1)
mkdir -p "$ROOT/bench/results"
cp "$raw" "$ROOT/bench/results/peers.jsonl"
cp "$(dirname "$raw")/table.txt" "$ROOT/bench/results/peers-table.txt"
cp "$(dirname "$raw")/environment.txt" "$ROOT/bench/results/peers-environment.txt"
echo "peers results -> bench/results/peers.jsonl"
