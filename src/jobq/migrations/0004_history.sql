-- jobq schema, version 4 (pre-deploy: only adds; processes of version 3 keep working).
--
-- History apart from live jobs: `jobs` keeps what can still run (queued, running, retrying);
-- a job that ends is moved, in the statement that ends it, to `jobs_history`, partitioned by
-- final status class and finish time, so that retention drops whole partitions. Idempotency
-- keys get a table of their own with an expiry. Counts come from rollups kept by triggers,
-- so that operator views never scan jobs. See docs/storage.md.

SET LOCAL lock_timeout = '5s';

-- History is written once and never updated. Lean: no lease columns (cleared when a job
-- ends), no request fingerprint (kept with the key), updated_at is finished_at.
CREATE TABLE jobs_history (
    id               uuid        NOT NULL,
    kind             text        NOT NULL,
    queue            text        NOT NULL,
    payload          jsonb       NOT NULL,
    status           text        NOT NULL,
    priority         smallint    NOT NULL,
    attempts         integer     NOT NULL,
    max_attempts     integer,
    run_at           timestamptz NOT NULL,
    idempotency_key  text,
    cancel_requested boolean     NOT NULL,
    lease_owner      text,
    last_error       text,
    errors           jsonb       NOT NULL,
    result           jsonb,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz NOT NULL
) PARTITION BY LIST (status);

-- One class per retention setting: JOBQ_RETENTION, JOBQ_RETENTION_FAILED.
CREATE TABLE jobs_history_done PARTITION OF jobs_history
    FOR VALUES IN ('succeeded', 'cancelled') PARTITION BY RANGE (finished_at);
CREATE TABLE jobs_history_failed PARTITION OF jobs_history
    FOR VALUES IN ('failed_permanent') PARTITION BY RANGE (finished_at);

-- Ascending: new ids arrive at the right edge of each run of keys, where a page split leaves
-- the old page full. Lists read them backwards, newest first. No unique index: one on a
-- partitioned table must contain the partition keys; a job id is unique because a job is in
-- exactly one of `jobs` and `jobs_history`, moved between them by single statements.
CREATE INDEX jobs_history_id_idx ON jobs_history (id);
CREATE INDEX jobs_history_kind_idx ON jobs_history (kind, id);
CREATE INDEX jobs_history_queue_idx ON jobs_history (queue, id);
-- Cancelled jobs are rare among the done class: listing them must not walk the succeeded.
CREATE INDEX jobs_history_cancelled_idx ON jobs_history (id) WHERE status = 'cancelled';

-- The leaves (one time range of one class each), so that retention and the creation of
-- leaves ahead need not parse partition bounds from the catalog.
CREATE TABLE jobq_history_partitions (
    name        text        PRIMARY KEY,
    class       text        NOT NULL CHECK (class IN ('done', 'failed')),
    lower_bound timestamptz NOT NULL,
    upper_bound timestamptz NOT NULL,
    CHECK (lower_bound < upper_bound)
);
CREATE INDEX jobq_history_partitions_bounds_idx
    ON jobq_history_partitions (class, upper_bound);

-- The leaf of `p_class` that holds finish time `p_at`, created if missing: `p_width` wide and
-- aligned to it, shortened where it would overlap a leaf made earlier with another width.
-- Created then attached (SHARE UPDATE EXCLUSIVE on the class table: completions and readers
-- go on), never `CREATE TABLE ... PARTITION OF` (ACCESS EXCLUSIVE). Safe to call at once from
-- many sessions: they queue on an advisory lock and the later ones find the leaf made.
CREATE FUNCTION jobq_history_ensure_partition(p_class text, p_at timestamptz, p_width interval)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    lower_at timestamptz := date_bin(p_width, p_at, timestamptz '2000-01-01 00:00:00+00');
    upper_at timestamptz := lower_at + p_width;
    leaf text;
    statuses text := CASE p_class WHEN 'done' THEN $q$('succeeded', 'cancelled')$q$
                                  ELSE $q$('failed_permanent')$q$ END;
BEGIN
    IF p_class NOT IN ('done', 'failed') THEN
        RAISE EXCEPTION 'unknown history class %', p_class;
    END IF;
    PERFORM set_config('lock_timeout', '2s', true);
    PERFORM pg_advisory_xact_lock(hashtext('jobq_history_partitions'));
    SELECT name INTO leaf FROM jobq_history_partitions
    WHERE class = p_class AND lower_bound <= p_at AND p_at < upper_bound;
    IF FOUND THEN
        RETURN leaf;
    END IF;
    SELECT greatest(lower_at, max(upper_bound)) INTO lower_at FROM jobq_history_partitions
    WHERE class = p_class AND upper_bound <= p_at AND upper_bound > lower_at;
    SELECT least(upper_at, min(lower_bound)) INTO upper_at FROM jobq_history_partitions
    WHERE class = p_class AND lower_bound > p_at AND lower_bound < upper_at;
    leaf := format('jobs_history_%s_%s', p_class,
                   to_char(lower_at AT TIME ZONE 'UTC', 'YYYYMMDD"t"HH24MISS'));
    EXECUTE format('CREATE TABLE %I (LIKE jobs_history_%s INCLUDING DEFAULTS)', leaf, p_class);
    -- Proves the partition constraint, so that ATTACH need not scan (the table is empty
    -- anyway; the constraint is dropped once attached).
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (status IN %s AND finished_at >= %L'
                   ' AND finished_at < %L)', leaf, leaf || '_bounds', statuses, lower_at, upper_at);
    EXECUTE format('ALTER TABLE jobs_history_%s ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   p_class, leaf, lower_at, upper_at);
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', leaf, leaf || '_bounds');
    INSERT INTO jobq_history_partitions (name, class, lower_bound, upper_bound)
    VALUES (leaf, p_class, lower_at, upper_at);
    RETURN leaf;
END
$$;

-- Leaves for today and the next two days; the maintenance loop keeps creating them ahead.
SELECT jobq_history_ensure_partition(c.class, now() + d.n * interval '1 day', interval '1 day')
FROM (VALUES ('done'), ('failed')) AS c(class), generate_series(0, 2) AS d(n);

-- Idempotency keys, remembered for at least the window after creation and as long as their
-- job exists (live or history); the job row keeps its key only for display.
CREATE TABLE jobq_idempotency_keys (
    key         text        PRIMARY KEY,
    job_id      uuid        NOT NULL,
    fingerprint text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX jobq_idempotency_keys_expires_idx ON jobq_idempotency_keys (expires_at);

-- Counts by queue, kind and status of every job in `jobs` and `jobs_history`, kept by
-- statement triggers on both tables, whoever writes (this version, version 3 during an
-- upgrade, an operator's SQL). A trigger only appends a delta row, so that concurrent
-- transactions never wait on a shared counter row (nor deadlock on two); readers sum the
-- deltas with the compacted counts, and compaction (one session at a time, under an advisory
-- lock) folds the deltas into `jobq_counts`.
CREATE TABLE jobq_counts (
    queue  text   NOT NULL,
    kind   text   NOT NULL,
    status text   NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (queue, kind, status)
);
CREATE TABLE jobq_count_deltas (
    queue  text   NOT NULL,
    kind   text   NOT NULL,
    status text   NOT NULL,
    n      bigint NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);

-- Jobs that ended, per minute, queue, kind and final status: throughput and failure views.
-- Appended per statement like the deltas; compaction merges each past minute's rows.
CREATE TABLE jobq_finished_minutes (
    minute timestamptz NOT NULL,
    queue  text        NOT NULL,
    kind   text        NOT NULL,
    status text        NOT NULL,
    n      bigint      NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000);
CREATE INDEX jobq_finished_minutes_minute_idx ON jobq_finished_minutes (minute);

CREATE FUNCTION jobq_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO jobq_count_deltas (queue, kind, status, n)
    SELECT queue, kind, status, count(*) FROM new_rows GROUP BY queue, kind, status;
    IF TG_TABLE_NAME = 'jobs_history'
       AND coalesce(current_setting('jobq.moving_history', true), '') <> 'on' THEN
        INSERT INTO jobq_finished_minutes (minute, queue, kind, status, n)
        SELECT date_trunc('minute', finished_at), queue, kind, status, count(*)
        FROM new_rows GROUP BY 1, 2, 3, 4;
    ELSIF TG_TABLE_NAME = 'jobs' THEN
        -- Version 3 processes insert keyed jobs with their key in `jobs` only: remember the
        -- key here too, so that this version sees it. Removed once every process is new.
        INSERT INTO jobq_idempotency_keys (key, job_id, fingerprint, created_at, expires_at)
        SELECT idempotency_key, id, request_fingerprint, created_at,
               created_at + interval '24 hours'
        FROM new_rows WHERE idempotency_key IS NOT NULL
        ON CONFLICT (key) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION jobq_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO jobq_count_deltas (queue, kind, status, n)
    SELECT queue, kind, status, -count(*) FROM old_rows GROUP BY queue, kind, status;
    RETURN NULL;
END
$$;

CREATE FUNCTION jobq_count_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO jobq_count_deltas (queue, kind, status, n)
    SELECT queue, kind, status, sum(n) FROM (
        SELECT queue, kind, status, 1 AS n FROM new_rows
        UNION ALL
        SELECT queue, kind, status, -1 FROM old_rows
    ) AS d
    GROUP BY queue, kind, status
    HAVING sum(n) <> 0;
    -- A version 3 process ends jobs in place: count them as finished.
    INSERT INTO jobq_finished_minutes (minute, queue, kind, status, n)
    SELECT date_trunc('minute', n.finished_at), n.queue, n.kind, n.status, count(*)
    FROM new_rows AS n JOIN old_rows AS o ON o.id = n.id
    WHERE n.status IN ('succeeded', 'failed_permanent', 'cancelled')
      AND o.status NOT IN ('succeeded', 'failed_permanent', 'cancelled')
    GROUP BY 1, 2, 3, 4;
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION jobq_count_inserted();
CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION jobq_count_deleted();
CREATE TRIGGER jobs_count_update AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION jobq_count_updated();
CREATE TRIGGER jobs_history_count_insert AFTER INSERT ON jobs_history
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION jobq_count_inserted();
CREATE TRIGGER jobs_history_count_delete AFTER DELETE ON jobs_history
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION jobq_count_deleted();

-- Counts from scratch: what compaction would give if every delta had been kept. Runs under
-- the compaction lock; the deltas it removes and the rows it counts are read in one snapshot,
-- so a transaction that commits meanwhile is counted exactly once (by its delta, kept).
CREATE FUNCTION jobq_counts_rebuild() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('jobq_counts'));
    -- A statement of its own: one that deletes a key cannot insert it again (unique index).
    -- Only compaction writes here, and it waits for this lock.
    DELETE FROM jobq_counts;
    WITH cleared AS (
        DELETE FROM jobq_count_deltas
    )
    INSERT INTO jobq_counts (queue, kind, status, n)
    SELECT queue, kind, status, count(*)
    FROM (SELECT queue, kind, status FROM jobs
          UNION ALL
          SELECT queue, kind, status FROM jobs_history) AS j
    GROUP BY queue, kind, status;
END
$$;
