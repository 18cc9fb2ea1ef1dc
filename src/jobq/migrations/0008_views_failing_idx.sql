-- jobq:outside-transaction
-- jobq:post-deploy
-- jobq schema, version 8: an index for the failing-kinds view (GET /stats, the dashboard,
-- `jobq status`): the retrying job of a kind that failed last, found without reading the
-- backlog. Written only for failing jobs: retrying ones, and failed_permanent ones where
-- version 3 left them in `jobs`.
--
-- Runs outside a transaction, so that the index is built without blocking writes. A build
-- interrupted by a crash leaves an invalid index behind: drop it and build again.

DROP INDEX CONCURRENTLY IF EXISTS jobs_failing_idx;
CREATE INDEX CONCURRENTLY jobs_failing_idx ON jobs (kind, updated_at)
    WHERE status IN ('retrying', 'failed_permanent');
