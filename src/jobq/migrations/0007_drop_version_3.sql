-- jobq:post-deploy
-- jobq:outside-transaction
-- jobq:lock-timeout 2s
-- jobq schema, version 7 (post-deploy, after version 6): what only version 3 needed goes.
-- Every statement waits at most 2 s for a lock and can run again after a crash or a lock
-- timeout (an index whose concurrent drop was interrupted is left invalid; the next run
-- drops it).

-- The count triggers without their version 3 parts: keyed jobs now store their key in
-- jobq_idempotency_keys themselves, and no process ends a job in place any more (ending it
-- moves it to jobs_history, whose insert counts it as finished).
CREATE OR REPLACE FUNCTION jobq_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO jobq_count_deltas (queue, kind, status, n)
    SELECT queue, kind, status, count(*) FROM new_rows GROUP BY queue, kind, status;
    IF TG_TABLE_NAME = 'jobs_history'
       AND coalesce(current_setting('jobq.moving_history', true), '') <> 'on' THEN
        INSERT INTO jobq_finished_minutes (minute, queue, kind, status, n)
        SELECT date_trunc('minute', finished_at), queue, kind, status, count(*)
        FROM new_rows GROUP BY 1, 2, 3, 4;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION jobq_count_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO jobq_count_deltas (queue, kind, status, n)
    SELECT queue, kind, status, sum(n) FROM (
        SELECT queue, kind, status, 1 AS n FROM new_rows
        UNION ALL
        SELECT queue, kind, status, -1 FROM old_rows
    ) AS d
    GROUP BY queue, kind, status
    HAVING sum(n) <> 0;
    RETURN NULL;
END
$$;

-- History is listed from jobs_history's indexes; the live table is listed by its primary key
-- (ids are time-ordered) and finds keys in jobq_idempotency_keys. Each of these cost every
-- write of every job an index entry.
DROP INDEX CONCURRENTLY IF EXISTS jobs_created_idx;
DROP INDEX CONCURRENTLY IF EXISTS jobs_status_created_idx;
DROP INDEX CONCURRENTLY IF EXISTS jobs_kind_created_idx;
DROP INDEX CONCURRENTLY IF EXISTS jobs_queue_created_idx;
DROP INDEX CONCURRENTLY IF EXISTS jobs_finished_idx;
DROP INDEX CONCURRENTLY IF EXISTS jobs_idempotency_key_idx;

-- The live table is small (the backlog): half of each page left free keeps more claim
-- updates on their page. Applies to pages written from now on; no rewrite.
ALTER TABLE jobs SET (fillfactor = 50);
