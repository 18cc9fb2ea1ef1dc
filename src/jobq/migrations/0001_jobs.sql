-- jobq schema, version 1: the jobs table and the indexes its queries rely on.

-- Time-ordered UUIDs (version 7): ids sort by creation, which keeps the primary key's
-- insertions at the right edge of the index.
CREATE OR REPLACE FUNCTION jobq_uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
  SELECT encode(
    set_bit(
      set_bit(
        overlay(uuid_send(gen_random_uuid())
                placing substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                FROM 1 FOR 6),
        52, 1),
      53, 1),
    'hex')::uuid
$$;

CREATE TABLE jobs (
    id                  uuid        PRIMARY KEY DEFAULT jobq_uuid_v7(),
    kind                text        NOT NULL,
    queue               text        NOT NULL DEFAULT 'default',
    payload             jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status              text        NOT NULL DEFAULT 'queued',
    priority            smallint    NOT NULL DEFAULT 0,
    attempts            integer     NOT NULL DEFAULT 0,
    max_attempts        integer     NOT NULL DEFAULT 3,
    run_at              timestamptz NOT NULL DEFAULT now(),
    idempotency_key     text,
    request_fingerprint text,
    cancel_requested    boolean     NOT NULL DEFAULT false,
    lease_owner         text,
    lease_token         uuid,
    lease_expires_at    timestamptz,
    -- The delay chosen for the previous retry: decorrelated jitter draws the next from it.
    retry_delay_seconds double precision,
    last_error          text,
    errors              jsonb       NOT NULL DEFAULT '[]'::jsonb,
    result              jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    CONSTRAINT jobs_status_check CHECK (status IN
        ('queued', 'running', 'retrying', 'succeeded', 'failed_permanent', 'cancelled')),
    CONSTRAINT jobs_attempts_check CHECK (attempts >= 0),
    CONSTRAINT jobs_max_attempts_check CHECK (max_attempts BETWEEN 1 AND 1000),
    CONSTRAINT jobs_kind_check CHECK (length(kind) BETWEEN 1 AND 255),
    CONSTRAINT jobs_queue_check CHECK (length(queue) BETWEEN 1 AND 255),
    CONSTRAINT jobs_lease_check CHECK (status <> 'running' OR lease_token IS NOT NULL)
) WITH (
    -- Every job row is updated several times: leave room on each page so updates can stay
    -- on the page, and vacuum the hot table far more eagerly than the default.
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_limit = 2000
);

-- The claim query: only jobs that can run, in claim order. Finished rows never enter it, so
-- a table holding millions of finished jobs claims as fast as an empty one.
CREATE INDEX jobs_claim_idx ON jobs (priority, run_at, id)
    WHERE status IN ('queued', 'retrying');

-- Rescue: running jobs by lease expiry.
CREATE INDEX jobs_lease_idx ON jobs (lease_expires_at) WHERE status = 'running';

-- Idempotency keys are unique when present.
CREATE UNIQUE INDEX jobs_idempotency_key_idx ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The list endpoint: newest first, optionally filtered by status, kind or queue.
CREATE INDEX jobs_created_idx ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_status_created_idx ON jobs (status, created_at DESC, id DESC);
CREATE INDEX jobs_kind_created_idx ON jobs (kind, created_at DESC, id DESC);
CREATE INDEX jobs_queue_created_idx ON jobs (queue, created_at DESC, id DESC);
