-- jobq schema, version 14 (pre-deploy: only adds; the previous version keeps working and
-- derives no key).
--
-- Where a kind's (or a queue's) concurrency key comes from: a path into the payload, declared
-- with the limits by the workers' registries (`concurrency_key="tenant"`). Every statement
-- that inserts a job without a key derives it from the payload here, in the database, so that
-- every way of enqueueing (Queue.enqueue, enqueue_many, jobq.txn, the CLI, the HTTP API with
-- or without a registry) gives a job of that kind the same key. See docs/flow-control.md.

SET LOCAL lock_timeout = '5s';

-- NULL: no key is derived. A row holding only a path is neither paused nor limited: the plain
-- claim still takes its jobs.
ALTER TABLE jobq_flow_controls ADD COLUMN IF NOT EXISTS key_path text[]
    CHECK (cardinality(key_path) BETWEEN 1 AND 16);

-- A job's key from its payload, as Handler.key_of reads it: a string, or an integer written
-- in decimal; anything else (absent, null, another type, too long, control characters) gives
-- no key rather than one the API would refuse.
CREATE OR REPLACE FUNCTION jobq_key_from_payload(payload jsonb, path text[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN length(payload #>> path) BETWEEN 1 AND 255 AND (
        (jsonb_typeof(payload #> path) = 'string' AND payload #>> path !~ '[\x01-\x1f\x7f-\x9f]')
        OR (jsonb_typeof(payload #> path) = 'number' AND payload #>> path ~ '^-?[0-9]+$')
    ) THEN payload #>> path END
$$;
