#!/usr/bin/env bash
# SQL-only drain ceiling: N jobs queued with jobq's own enqueue_many, then drained by pgbench
# running the queue core's own claim and completion with CLIENTS connections (no Python in
# the loop; the pgbench script is made by `python -m bench.drain_loop` from what Queue.claim
# and Queue.complete_many run). Also prints the drain's WAL bytes per job (claim + complete;
# the whole server's WAL, so run it on a server nothing else writes to). Tables are known
# only to bench/store.py, so this works on every storage layout.
#   bench/sql_ceiling.sh URL_OF_AN_EMPTY_DATABASE [N=20000] [CLIENTS=2]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
URL=${1:?database URL}; N=${2:-20000}; CLIENTS=${3:-2}
PY=${PYTHON:-$ROOT/.venv/bin/python}
PGBENCH=${PGBENCH:-$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench | tail -1)}
cd "$ROOT"
"$PY" - "$URL" "$N" <<'PYEOF'
import asyncio, sys
from bench import store
from jobq import NewJob, Queue, db, schema
async def main(url: str, n: int) -> None:
    conn = await db.connect(url)
    await schema.migrate(conn)
    await store.empty_all(conn)
    await conn.close()
    pool = await db.create_pool(url, min_size=1, max_size=2)
    q = Queue(pool)
    for s in range(0, n, 5000):
        await q.enqueue_many([NewJob("noop", {"i": i}) for i in range(s, min(n, s + 5000))])
    await pool.execute("VACUUM ANALYZE")
    await pool.close()
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
PYEOF
SCRIPT=${SCRIPT:-${TMPDIR:-/tmp}/jobq-drain-loop.sql}
"$PY" -m bench.drain_loop "$URL" > "$SCRIPT"
per_client=$(( (N / 250 + CLIENTS - 1) / CLIENTS + 1 ))
lsn0=$(psql "$URL" -Atc "SELECT pg_current_wal_lsn()")
start=$(date +%s.%N)
"$PGBENCH" -n -f "$SCRIPT" -c "$CLIENTS" -j "$CLIENTS" -t "$per_client" "$URL" >/dev/null 2>"${TMPDIR:-/tmp}/jobq-pgbench.log" || { cat "${TMPDIR:-/tmp}/jobq-pgbench.log" >&2; exit 1; }
end=$(date +%s.%N)
wal=$(psql "$URL" -Atc "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn0')")
done_n=$("$PY" -c "import asyncio, asyncpg, sys; from bench import store
async def m(): c = await asyncpg.connect(sys.argv[1]); print(await store.succeeded_total(c)); await c.close()
asyncio.run(m())" "$URL")
python3 -c "import json,sys; n=$done_n; s=$end-$start; print(json.dumps({'bench':'sql_ceiling','clients':$CLIENTS,'n':n,'seconds':round(s,3),'jobs_per_s':round(n/s,1),'drain_wal_bytes_per_job':round($wal/max(n,1),1),'ok':n==$N}))"
