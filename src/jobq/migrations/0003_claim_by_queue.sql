-- jobq:outside-transaction
-- jobq schema, version 3: claims bounded by queue; max_attempts may be left to the handler.
--
-- Runs outside a transaction, one statement at a time, so that the index is built without
-- blocking writes to a live table. Every statement can run again after a crash.

-- NULL means "not specified": the worker that claims the job fills in its handler's value.
-- Dropping NOT NULL and a default only changes the catalog.
ALTER TABLE jobs ALTER COLUMN max_attempts DROP NOT NULL, ALTER COLUMN max_attempts DROP DEFAULT;

-- The claim reads one queue's waiting jobs in claim order and, within one priority, only the
-- due ones: another queue's backlog and future-dated jobs are never read. A build interrupted
-- by a crash leaves an invalid index behind: drop it and build again.
DROP INDEX CONCURRENTLY IF EXISTS jobs_queue_claim_idx;
CREATE INDEX CONCURRENTLY jobs_queue_claim_idx ON jobs (queue, priority, run_at, id)
    WHERE status IN ('queued', 'retrying');

-- Replaced by the index above; one index fewer to maintain on every write.
DROP INDEX CONCURRENTLY IF EXISTS jobs_claim_idx;
