-- jobq schema, version 11 (pre-deploy, additive): periodic schedules and unique jobs.
--
-- jobq_schedules: one row per schedule the workers declare (jobq.periodic). `last_tick` is
-- the latest tick enqueued; the statement that enqueues a tick moves it forward in the same
-- transaction, only when the tick is later, so each (name, tick) is enqueued at most once
-- however many workers run the scheduler (docs/scheduling.md). `declared_at` is refreshed
-- by every worker that declares the schedule: the listings show schedules declared lately.
--
-- jobq_unique_keys: a unique job's key (kind, queue and the payload fields it is unique by,
-- hashed) and the job holding it until `expires_at`. Expired keys are deleted by the
-- cleaner. Neither table is read or written for jobs and workers that use neither feature.

CREATE TABLE jobq_schedules (
    name         text        PRIMARY KEY,
    kind         text        NOT NULL,
    queue        text        NOT NULL,
    spec         text        NOT NULL,
    last_tick    timestamptz NOT NULL,
    last_job_id  uuid,
    next_run_at  timestamptz,
    declared_at  timestamptz NOT NULL DEFAULT now(),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE jobq_unique_keys (
    key         text        PRIMARY KEY,
    job_id      uuid        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX jobq_unique_keys_expires_idx ON jobq_unique_keys (expires_at);
