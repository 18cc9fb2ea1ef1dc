"""The heartbeat statement before and after SKIP LOCKED + clock_timestamp(), in one run.

One database holds `held` running jobs (leases of one worker) among 100,000 finished ones.
Both statements extend the same leases, interleaved in alternating order, `rounds` rounds of
`n` heartbeats each, for 10, 100 and 1,000 leases: the cost per heartbeat, without a worker
around it. "before" is the plain UPDATE the heartbeat used to be; "after" is
`queue._HEARTBEAT`, which also reads every row once more to tell a skipped lease from a lost one.

    python -m bench.heartbeat
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from bench.suite import fresh_db, server
from jobq import db
from jobq.queue.leases import _HEARTBEAT

_HEARTBEAT_BEFORE = """
UPDATE jobs AS j
SET lease_expires_at = now() + make_interval(secs => $3)
FROM unnest($1::uuid[], $2::uuid[]) AS r(id, token)
WHERE j.id = r.id AND j.lease_token = r.token AND j.status = 'running'
RETURNING j.id, j.cancel_requested
"""

_LOAD_FINISHED = """
INSERT INTO jobs (kind, queue, max_attempts, status, attempts, finished_at)
SELECT 'noop', 'default', 3, 'succeeded', 1, now() FROM generate_series(1, $1)
"""

_LOAD_RUNNING = """
INSERT INTO jobs (kind, queue, max_attempts, status, attempts, started_at, lease_owner,
                  lease_token, lease_expires_at)
SELECT 'noop', 'default', 3, 'running', 1, now(), 'bench', gen_random_uuid(),
       now() + interval '1 hour'
FROM generate_series(1, $1)
RETURNING id, lease_token
"""


async def main(rounds: int = 5, n: int = 200) -> None:
    with server() as admin:
        async with fresh_db(admin, "heartbeat") as dsn:
            conn = await db.connect(dsn)
            try:
                await conn.execute(_LOAD_FINISHED, 100_000)
                for held in (10, 100, 1000):
                    await conn.execute("DELETE FROM jobs WHERE status = 'running'")
                    rows = await conn.fetch(_LOAD_RUNNING, held)
                    await conn.execute("VACUUM ANALYZE jobs")
                    args = ([r["id"] for r in rows], [r["lease_token"] for r in rows], 30.0)
                    ms: dict[str, list[float]] = {"before": [], "after": []}
                    for r in range(rounds):
                        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
                        for label in order:
                            sql = _HEARTBEAT_BEFORE if label == "before" else _HEARTBEAT
                            started = time.perf_counter()
                            for _ in range(n):
                                assert len(await conn.fetch(sql, *args)) == held
                            ms[label].append((time.perf_counter() - started) * 1000 / n)
                    for label, values in ms.items():
                        runs = ", ".join(f"{v:.3f}" for v in values)
                        print(
                            f"{held:>5} leases, {label:<6}: median "
                            f"{statistics.median(values):.3f} ms per heartbeat ({runs})"
                        )
            finally:
                await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
