-- jobq schema, version 19 (pre-deploy: only adds; the previous version's
-- jobq_key_from_json keeps its meaning).
--
-- The key rule of migration 0017 on the value a path picked, so that an insert reads each
-- payload for its key once: jobq_key_from_json is not inlined (a function call per job, which
-- costs more than the reading), and an inlined function of the whole payload would read it
-- once for every use of its argument. Inserts pick the value in a subquery and give it here;
-- this function, a single expression of an already picked value, is inlined.

SET LOCAL lock_timeout = '5s';

-- A string of 1 to 255 characters without control characters, or an integer written as digits
-- with an optional minus (`-0` reads as `0`, as Python reads it); anything else, NULL.
CREATE OR REPLACE FUNCTION jobq_key_of_value(value json) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE json_typeof(value)
        WHEN 'string' THEN CASE WHEN length(value #>> '{}') BETWEEN 1 AND 255
                                 AND value #>> '{}' !~ '[\x01-\x1f\x7f-\x9f]'
                                THEN value #>> '{}' END
        WHEN 'number' THEN CASE WHEN value::text ~ '^-?[0-9]+$' AND length(value::text) <= 255
                                THEN CASE WHEN value::text = '-0' THEN '0' ELSE value::text END
                           END
    END
$$;

-- The same rule in one place.
CREATE OR REPLACE FUNCTION jobq_key_from_json(payload json, path text[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jobq_key_of_value(v) FROM (SELECT payload #> path AS v) AS picked
$$;
