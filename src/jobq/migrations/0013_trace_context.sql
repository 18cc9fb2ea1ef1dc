-- jobq schema, version 13 (pre-deploy: only adds; the previous version keeps working and
-- leaves the column NULL).
--
-- The trace context of the code that enqueued a job (the propagator's fields, W3C
-- `traceparent` and `tracestate` by default, as a JSON object), so that the span of its run
-- links to the span that enqueued it (jobq.otel). NULL unless OpenTelemetry is on. Carried to
-- jobs_history by the statements that end a job. Nullable without a default: adding it
-- rewrites no row, on the live table and on every history leaf.

SET LOCAL lock_timeout = '5s';

ALTER TABLE jobs ADD COLUMN trace_context jsonb;
ALTER TABLE jobs_history ADD COLUMN trace_context jsonb;
