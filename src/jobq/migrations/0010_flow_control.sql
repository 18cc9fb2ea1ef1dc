-- jobq:outside-transaction
-- jobq:lock-timeout 2s
-- jobq schema, version 10 (pre-deploy: only adds): flow control. Paused queues and kinds,
-- concurrency limits, rate limits and fair share, as the claim reads them; a concurrency key
-- per job. See docs/flow-control.md.
--
-- Runs outside a transaction, one statement at a time, so that the index is built without
-- blocking writes to a live table. Every statement can run again after a crash.

-- One row per queue or kind that is paused or limited. Pauses are written by operators
-- (POST /queues/{name}/pause); limits by workers at start-up, from their registries. A plain
-- claim (no limits anywhere) reads this table once per claim, by primary key, for the pause;
-- the limited claim locks its rows, so that claims sharing a limit take turns.
CREATE TABLE IF NOT EXISTS jobq_flow_controls (
    scope           text             NOT NULL CHECK (scope IN ('queue', 'kind')),
    name            text             NOT NULL CHECK (length(name) BETWEEN 1 AND 255),
    paused_at       timestamptz,
    paused_by       text,
    -- Limits, NULL where none: running jobs across every worker, running jobs per
    -- concurrency key, starts per second (a token bucket of `burst` tokens).
    max_concurrency integer          CHECK (max_concurrency > 0),
    max_per_key     integer          CHECK (max_per_key > 0),
    rate            double precision CHECK (rate > 0),
    burst           double precision CHECK (burst >= 1),
    -- Queues only: claims take concurrency keys in turn.
    fair            boolean          NOT NULL DEFAULT false,
    -- The bucket: tokens left at refilled_at.
    tokens          double precision,
    refilled_at     timestamptz,
    declared_by     text,
    declared_at     timestamptz,
    limited         boolean GENERATED ALWAYS AS (
        max_concurrency IS NOT NULL OR max_per_key IS NOT NULL OR rate IS NOT NULL OR fair
    ) STORED,
    PRIMARY KEY (scope, name)
);

-- The tenant, customer or account a job belongs to (set at enqueue): per-key limits and fair
-- share group by it. Nullable with no default: a catalog change only.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS concurrency_key text;
ALTER TABLE jobs_history ADD COLUMN IF NOT EXISTS concurrency_key text;

-- The limited claim walks one queue's keys (a loose index scan, one probe per key) and reads
-- each key's due jobs in claim order. Jobs without a key never enter it: it costs nothing to
-- those who do not use keys. A build interrupted by a crash leaves an invalid index: drop it
-- and build again.
DROP INDEX CONCURRENTLY IF EXISTS jobs_queue_key_claim_idx;
CREATE INDEX CONCURRENTLY jobs_queue_key_claim_idx
    ON jobs (queue, concurrency_key, priority, run_at, id)
    WHERE status IN ('queued', 'retrying') AND concurrency_key IS NOT NULL;
