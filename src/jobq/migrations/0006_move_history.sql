-- jobq:post-deploy
-- jobq:outside-transaction
-- jobq:lock-timeout 2s
-- jobq schema, version 6 (post-deploy: run once no process of version 3 is left). Finished
-- jobs that version 3 left in `jobs` move to `jobs_history`, 10,000 per transaction, so that
-- the live table holds only what can still run. Nothing waits on the move: each batch locks
-- only its own rows (SKIP LOCKED: a row someone else holds is taken by a later batch), and
-- readers see each job in exactly one of the two tables (a batch is one statement).
--
-- A procedure, so that each batch commits on its own: an interrupted move keeps what it
-- moved, and running this step again moves the rest. It reports its progress as NOTICEs.

CREATE OR REPLACE PROCEDURE jobq_move_finished_jobs(batch_size integer)
LANGUAGE plpgsql AS $$
DECLARE
    -- History older than this goes into one leaf per class (dropped whole once past
    -- retention) rather than a leaf per day; newer history into daily leaves.
    cutoff constant timestamptz :=
        date_bin('1 day', now() - interval '30 days', timestamptz '2000-01-01 00:00:00+00');
    ids uuid[];
    gap record;
    n_moved bigint;
    total bigint := 0;
    todo bigint;
    waited integer := 0;
    started timestamptz := clock_timestamp();
    reported timestamptz := clock_timestamp();
BEGIN
    SELECT count(*) INTO todo FROM jobs
    WHERE finished_at IS NOT NULL AND status IN ('succeeded', 'failed_permanent', 'cancelled');
    RAISE NOTICE 'moving % finished job(s) to jobs_history, % per transaction', todo, batch_size;
    LOOP
        PERFORM set_config('lock_timeout', '2s', true);
        -- These jobs were counted as finished when they finished: not again.
        PERFORM set_config('jobq.moving_history', 'on', true);
        -- Oldest first, by jobs_finished_idx, which holds only finished rows.
        SELECT array_agg(id) INTO ids FROM (
            SELECT id FROM jobs
            WHERE finished_at IS NOT NULL
              AND status IN ('succeeded', 'failed_permanent', 'cancelled')
            ORDER BY finished_at
            LIMIT batch_size
            FOR UPDATE SKIP LOCKED
        ) AS batch;
        IF ids IS NULL THEN
            -- What is left is locked by other transactions: wait for them as long as a lock
            -- timeout would, then give up (running the step again moves the rest).
            EXIT WHEN NOT EXISTS (
                SELECT 1 FROM jobs
                WHERE finished_at IS NOT NULL
                  AND status IN ('succeeded', 'failed_permanent', 'cancelled'));
            IF waited >= 10 THEN
                RAISE EXCEPTION 'finished jobs locked by other transactions for over 2 s'
                    USING ERRCODE = 'lock_not_available',
                          HINT = 'moved ' || total || '; the rest move when the step runs again';
            END IF;
            waited := waited + 1;
            COMMIT;
            PERFORM pg_sleep(0.2);
            CONTINUE;
        END IF;
        -- The leaves these rows need, created first: an insert with no leaf for its row fails.
        LOOP
            SELECT CASE j.status WHEN 'failed_permanent' THEN 'failed' ELSE 'done' END AS class,
                   j.finished_at
            INTO gap
            FROM jobs AS j
            WHERE j.id = ANY (ids)
              AND NOT EXISTS (
                  SELECT 1 FROM jobq_history_partitions AS p
                  WHERE p.class = CASE j.status WHEN 'failed_permanent' THEN 'failed'
                                                ELSE 'done' END
                    AND p.lower_bound <= j.finished_at AND j.finished_at < p.upper_bound)
            ORDER BY j.finished_at
            LIMIT 1;
            EXIT WHEN NOT FOUND;
            IF gap.finished_at < cutoff THEN
                -- The daily leaf at the cutoff first: the old leaf then ends where it begins.
                PERFORM jobq_history_ensure_partition(gap.class, cutoff, interval '1 day');
                PERFORM jobq_history_ensure_partition(gap.class, gap.finished_at,
                                                      interval '36500 days');
            ELSE
                PERFORM jobq_history_ensure_partition(gap.class, gap.finished_at,
                                                      interval '1 day');
            END IF;
        END LOOP;
        WITH moved AS (
            DELETE FROM jobs WHERE id = ANY (ids)
            RETURNING *
        )
        INSERT INTO jobs_history (
            id, kind, queue, payload, status, priority, attempts, max_attempts, run_at,
            idempotency_key, cancel_requested, lease_owner, last_error, errors, result,
            created_at, started_at, finished_at)
        SELECT id, kind, queue, payload, status, priority, attempts, max_attempts, run_at,
               idempotency_key, cancel_requested, lease_owner, last_error, errors, result,
               created_at, started_at, finished_at
        FROM moved;
        GET DIAGNOSTICS n_moved = ROW_COUNT;
        total := total + n_moved;
        COMMIT;
        IF clock_timestamp() - reported >= interval '5 seconds' THEN
            reported := clock_timestamp();
            RAISE NOTICE 'moved % of % (% per second)', total, todo,
                round(total / greatest(extract(epoch FROM reported - started), 0.001));
        END IF;
    END LOOP;
    RAISE NOTICE 'moved % finished job(s) in % s', total,
        round(extract(epoch FROM clock_timestamp() - started)::numeric, 1);
END
$$;

CALL jobq_move_finished_jobs(10000);

DROP PROCEDURE IF EXISTS jobq_move_finished_jobs(integer);
