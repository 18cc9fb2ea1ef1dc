-- jobq:outside-transaction
-- jobq schema, version 5 (pre-deploy): the rollups start from the jobs that exist, and keys of
-- existing jobs are remembered in the key table.
--
-- Outside a transaction, so that creating the triggers (version 4) does not hold its lock on
-- `jobs` while every row is read. Every statement can run again after a crash.

SELECT jobq_counts_rebuild();

INSERT INTO jobq_idempotency_keys (key, job_id, fingerprint, created_at, expires_at)
SELECT idempotency_key, id, request_fingerprint, created_at, created_at + interval '24 hours'
FROM jobs WHERE idempotency_key IS NOT NULL
ON CONFLICT (key) DO NOTHING;
