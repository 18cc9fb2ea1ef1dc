-- jobq schema, version 18 (pre-deploy: only adds; the previous version ignores it, and takes
-- every key of a fair queue with a weight of 1).
--
-- Weighted fair share (docs/flow-control.md): in a fair queue, a concurrency key with weight
-- w gets w turns per round. A JSON object from key to weight; a key it does not name has
-- weight 1. Declared with the queue's limits by the workers' registries.

SET LOCAL lock_timeout = '5s';

ALTER TABLE jobq_flow_controls
    ADD COLUMN fair_weights jsonb CHECK (jsonb_typeof(fair_weights) = 'object');
