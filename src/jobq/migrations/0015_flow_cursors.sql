-- jobq schema, version 15 (pre-deploy: only adds; the previous version never reads it).
--
-- Where the limited claim's walk over a keyed queue's concurrency keys stopped: the next claim
-- starts after this key, so that claims visiting a bounded number of keys each still serve
-- every key in turn (docs/flow-control.md). One row per keyed queue, written by the claim;
-- losing it only restarts the round at the first key.

SET LOCAL lock_timeout = '5s';

CREATE TABLE jobq_flow_cursors (
    queue      text        PRIMARY KEY CHECK (length(queue) BETWEEN 1 AND 255),
    after_key  text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
