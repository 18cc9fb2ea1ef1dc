-- jobq schema, version 17 (pre-deploy: only adds; the previous version keeps deriving keys
-- with jobq_key_from_payload).
--
-- A job's key from its payload as the insert receives it, JSON text, so that a number is read
-- as it is written: the registry (Handler.key_of) takes an integer only when the JSON writes
-- one (`100`), and Python's JSON readers give a float for `1e2`, `1E+16` or `100.0`; jsonb
-- keeps no trace of the writing (`'1e2'::jsonb` is `100`), so jobq_key_from_payload made keys
-- of those. The rule, the same on both paths: a string of 1 to 255 characters without control
-- characters, or an integer written as digits with an optional minus (`-0` reads as `0`, as in
-- Python); anything else gives no key.
--
-- Not inlinable (a FROM clause): the payload argument is evaluated once and read once, where
-- the inlined jobq_key_from_payload repeated its argument, a cast of the whole payload, for
-- every use.

SET LOCAL lock_timeout = '5s';

CREATE OR REPLACE FUNCTION jobq_key_from_json(payload json, path text[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE json_typeof(v)
        WHEN 'string' THEN CASE WHEN length(v #>> '{}') BETWEEN 1 AND 255
                                 AND v #>> '{}' !~ '[\x01-\x1f\x7f-\x9f]' THEN v #>> '{}' END
        WHEN 'number' THEN CASE WHEN v::text ~ '^-?[0-9]+$' AND length(v::text) <= 255
                                 THEN CASE WHEN v::text = '-0' THEN '0' ELSE v::text END END
    END
    FROM (SELECT payload #> path AS v) AS picked
$$;
