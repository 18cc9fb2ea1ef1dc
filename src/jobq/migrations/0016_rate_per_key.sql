-- jobq schema, version 16 (pre-deploy: only adds; the previous version does not know a
-- per-key rate, so roll every worker before declaring one).
--
-- Per-key rate limits (docs/flow-control.md): a queue's or kind's `rate_per_key` gives every
-- concurrency key its own token bucket of `burst_per_key` starts. A key's bucket is a row of
-- jobq_flow_key_buckets, written by the limited claim (under the limit's row lock) once the
-- key has started a job; a key without a row has a full bucket.

SET LOCAL lock_timeout = '5s';

ALTER TABLE jobq_flow_controls
    ADD COLUMN rate_per_key  double precision CHECK (rate_per_key > 0),
    ADD COLUMN burst_per_key double precision CHECK (burst_per_key >= 1);

-- `limited` also when only a per-key rate is set. A generated column's expression cannot be
-- altered before PostgreSQL 17: it is made again (the table holds a few rows).
ALTER TABLE jobq_flow_controls DROP COLUMN limited;
ALTER TABLE jobq_flow_controls ADD COLUMN limited boolean GENERATED ALWAYS AS (
    max_concurrency IS NOT NULL OR max_per_key IS NOT NULL OR rate IS NOT NULL OR fair
    OR rate_per_key IS NOT NULL
) STORED;

-- Tokens left at refilled_at, per (limit, key). Removed with the limit's row; rows of keys
-- whose bucket has refilled are removed by the claim, a few at a time.
CREATE TABLE jobq_flow_key_buckets (
    scope       text             NOT NULL,
    name        text             NOT NULL,
    key         text             NOT NULL,
    tokens      double precision NOT NULL,
    refilled_at timestamptz      NOT NULL,
    PRIMARY KEY (scope, name, key),
    FOREIGN KEY (scope, name) REFERENCES jobq_flow_controls (scope, name) ON DELETE CASCADE
);
