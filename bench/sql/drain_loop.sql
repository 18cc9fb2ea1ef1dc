-- The SQL-only drain ceiling for jobq's schema (pgbench script, see bench/sql_ceiling.sh):
-- what the worker's statements cost without any Python. Claim up to 250 due jobs with SKIP
-- LOCKED and lease them (one commit), then complete them fenced by lease token (a second
-- commit): the same two statements, the same two commits per batch as `jobq.Worker`.
WITH picked AS (
    SELECT id FROM jobs
    WHERE status IN ('queued', 'retrying') AND run_at <= now()
      AND kind = ANY ('{noop}'::text[]) AND queue = ANY ('{default}'::text[])
    ORDER BY priority, run_at, id
    LIMIT 250
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE jobs AS j
    SET status = 'running', attempts = j.attempts + 1, started_at = now(), updated_at = now(),
        lease_owner = 'pgbench', lease_token = gen_random_uuid(),
        lease_expires_at = now() + interval '30 seconds'
    FROM picked WHERE j.id = picked.id
    RETURNING j.id, j.lease_token
)
SELECT coalesce(array_agg(id), '{}') AS ids, coalesce(array_agg(lease_token), '{}') AS toks
FROM claimed \gset
UPDATE jobs AS j
SET status = 'succeeded', result = 'null', finished_at = now(), updated_at = now(),
    lease_token = NULL, lease_expires_at = NULL
FROM unnest(':ids'::uuid[], ':toks'::uuid[]) AS r(id, token)
WHERE j.id = r.id AND j.lease_token = r.token AND j.status = 'running';
