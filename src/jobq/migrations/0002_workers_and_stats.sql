-- jobq schema, version 2: what the dashboard and `GET /stats` read.

-- Live workers and the kinds and queues each one handles. A worker refreshes its row every
-- heartbeat and deletes it when it stops; a row past `expires_at` belongs to a worker that
-- died. This is how the API knows which waiting jobs no running worker can take: only the
-- workers know their registries (the API may run without one, or with a different one).
CREATE TABLE jobq_workers (
    worker_id    text        PRIMARY KEY,
    kinds        text[]      NOT NULL,
    queues       text[]      NOT NULL,
    concurrency  integer     NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);

-- Throughput and recent failures: finished jobs by time, without reading the whole table.
CREATE INDEX jobs_finished_idx ON jobs (finished_at) WHERE finished_at IS NOT NULL;
