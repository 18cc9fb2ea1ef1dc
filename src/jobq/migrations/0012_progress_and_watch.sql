-- jobq schema, version 12 (pre-deploy: only adds; processes of the previous version keep
-- working, and leave both columns NULL).
--
-- `progress`: what a running handler last reported with ctx.progress (fraction, message, the
-- attempt that reported it and when), shown with the job and kept in history.
-- `watched`: set once someone waits on the job (GET /jobs/{id}?wait=, Queue.wait). The
-- statements that end a job, or write its progress, send a NOTIFY on `jobq_job_events` for a
-- watched row only: a job nobody waits on costs no NOTIFY (docs/integration.md).
--
-- Both nullable without a default: adding them rewrites no row, in `jobs` or in any leaf of
-- `jobs_history`; the brief ACCESS EXCLUSIVE lock waits at most the lock timeout.

SET LOCAL lock_timeout = '5s';

ALTER TABLE jobs ADD COLUMN progress jsonb, ADD COLUMN watched boolean;
ALTER TABLE jobs_history ADD COLUMN progress jsonb, ADD COLUMN watched boolean;
