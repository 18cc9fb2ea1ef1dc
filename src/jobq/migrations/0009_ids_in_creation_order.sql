-- Job ids sort in creation order, also within one millisecond (lists are newest first by id).
-- The previous jobq_uuid_v7() filled the 12 bits after the version with random bits, so jobs
-- created in the same millisecond (a bulk insert makes hundreds) sorted at random. These bits
-- now carry the time within the millisecond (RFC 9562, method 3). PostgreSQL 18's uuidv7()
-- does so, monotonic within a session even when the clock does not advance. Older servers
-- read clock_timestamp() in microseconds and break ties within one microsecond with a
-- counter in the next 14 bits (method 2): a sequence, cached per session, so that it costs a
-- write only once per 64 ids.
CREATE SEQUENCE IF NOT EXISTS jobq_id_counter CACHE 64 CYCLE;

DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 180000 THEN
        EXECUTE $f$
            CREATE OR REPLACE FUNCTION jobq_uuid_v7() RETURNS uuid
            LANGUAGE sql VOLATILE PARALLEL SAFE AS 'SELECT uuidv7()'
        $f$;
    ELSE
        EXECUTE $f$
            CREATE OR REPLACE FUNCTION jobq_uuid_v7() RETURNS uuid
            LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE AS $body$
            DECLARE
                -- One reading of the clock, so that the millisecond and the fraction agree.
                us bigint := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
            BEGIN
                RETURN encode(
                    overlay(overlay(overlay(uuid_send(gen_random_uuid())
                        placing substring(int8send(us / 1000) FROM 3) FROM 1 FOR 6)
                        placing int2send((28672 + us % 1000 * 4096 / 1000)::smallint) FROM 7 FOR 2)
                        placing substring(int4send(32768 | (nextval('jobq_id_counter') % 16384)::int)
                                          FROM 3) FROM 9 FOR 2),
                    'hex')::uuid;
            END
            $body$
        $f$;
    END IF;
END
$$;
