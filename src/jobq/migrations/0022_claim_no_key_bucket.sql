-- jobq schema, version 22 (pre-deploy: replaces a function with one of the same signature).
--
-- Under a per-key rate (rate_limit_per_key), jobs without a key share one bucket, the "no
-- key" key's, as they share one key's bound under max_per_key: they started without limit.
-- A claim that finds every kind or every queue paused or full no longer walks the keys first.
-- Generated from jobq.queue.flow.claim_limited_function(); tests/test_migrations.py checks
-- that the newest migration defining the function states what the code does.

SET LOCAL lock_timeout = '5s';

CREATE OR REPLACE FUNCTION
    jobq_claim_limited(text, text[], text[], int, float8, text[], int[], int, int)
RETURNS TABLE (
    id uuid,
    kind text,
    queue text,
    payload jsonb,
    status text,
    priority smallint,
    attempts integer,
    max_attempts integer,
    run_at timestamptz,
    idempotency_key text,
    cancel_requested boolean,
    lease_owner text,
    lease_token uuid,
    lease_expires_at timestamptz,
    retry_delay_seconds float8,
    last_error text,
    errors jsonb,
    result jsonb,
    created_at timestamptz,
    updated_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    concurrency_key text,
    progress jsonb,
    trace_context jsonb,
    _turn bigint, _pos int, _walked int, _held boolean, _keyed boolean, _written bigint
)
LANGUAGE plpgsql VOLATILE
-- One plan for every call: the decision is a large statement, whose planning for each call's
-- parameters took longer than a third of the claim's time.
SET plan_cache_mode = force_generic_plan
AS $fn$
#variable_conflict use_column
DECLARE
    w_queue text[];
    w_key text[];
    w_pos int[];
    w_room int[];
    w_fair boolean[];
    l_scope text[];
    l_name text[];
    cut boolean;
    is_shut boolean;
    is_full boolean;
    lock_keys boolean;
    no_key boolean := true;
    w_held boolean[] := '{}';
    visited int := 0;
    locked int := 0;
    hinted jsonb := '{}';
    queue_hinted int;
BEGIN
    SELECT coalesce(array_agg(x.queue ORDER BY x.pos, x.queue) FILTER (WHERE x.key IS NOT NULL), '{}'),
           coalesce(array_agg(x.key ORDER BY x.pos, x.queue) FILTER (WHERE x.key IS NOT NULL), '{}'),
           coalesce(array_agg(x.pos ORDER BY x.pos, x.queue) FILTER (WHERE x.key IS NOT NULL), '{}'),
           coalesce(array_agg(x.room ORDER BY x.pos, x.queue) FILTER (WHERE x.key IS NOT NULL), '{}'),
           coalesce(array_agg(x.fair ORDER BY x.pos, x.queue) FILTER (WHERE x.key IS NOT NULL), '{}'),
           coalesce(bool_or(x.pos >= $9), false), bool_or(x.shut), bool_or(x.full),
           bool_or(x.lock_keys)
    INTO w_queue, w_key, w_pos, w_room, w_fair, cut, is_shut, is_full, lock_keys
    FROM (
WITH RECURSIVE ctl AS (
    SELECT c.scope, c.name, c.paused_at IS NOT NULL AS paused, c.fair, c.max_per_key,
           floor(c.burst_per_key)::int AS key_burst,
           c.max_per_key IS NOT NULL OR c.rate_per_key IS NOT NULL AS per_key
    FROM jobq_flow_controls AS c
    WHERE c.limited AND ((c.scope = 'kind' AND c.name = ANY($2::text[]))
                         OR (c.scope = 'queue' AND c.name = ANY($3::text[])))
), walked AS (
    SELECT q.queue, coalesce(cur.after_key, '') AS after_key, coalesce(ctl.fair, false) AS fair
    FROM unnest($3::text[]) AS q(queue)
    LEFT JOIN ctl ON ctl.scope = 'queue' AND ctl.name = q.queue
    LEFT JOIN jobq_flow_cursors AS cur ON cur.queue = q.queue
    WHERE $9 > 0 AND NOT coalesce(ctl.paused, false) AND NOT (SELECT shut FROM shut)
      AND (coalesce(ctl.fair, false) OR coalesce(ctl.per_key, false)
           OR EXISTS (SELECT 1 FROM ctl AS k WHERE k.scope = 'kind' AND k.per_key AND NOT k.paused))
), kinds_keyed AS MATERIALIZED (
    -- The kinds claimed (but paused ones) with a per-key bound, and the others: a key whose
    -- bounded kinds are full may still start jobs of the others.
    SELECT coalesce(array_agg(k.kind) FILTER (WHERE c.per_key), '{}') AS bounded,
           coalesce(array_agg(k.kind) FILTER (WHERE NOT coalesce(c.per_key, false)), '{}')
               AS unbounded
    FROM unnest($2::text[]) AS k(kind)
    LEFT JOIN ctl AS c ON c.scope = 'kind' AND c.name = k.kind
    WHERE NOT coalesce(c.paused, false)
), running AS MATERIALIZED (
    -- A hint of the running jobs of each key under a per-key limit, as two maps (per queue
    -- and key, per kind and key), for choosing which keys to lock: the decision counts them
    -- again, under the locks.
    SELECT coalesce(jsonb_object_agg(x.k, x.n) FILTER (WHERE x.by = 'queue'), '{}') AS by_queue,
           coalesce(jsonb_object_agg(x.k, x.n) FILTER (WHERE x.by = 'kind'), '{}') AS by_kind
    FROM (
        SELECT g.by, g.k, count(*) AS n
        FROM jobs AS j
        CROSS JOIN LATERAL (VALUES ('queue', j.queue || chr(31) || j.concurrency_key),
                                   ('kind', j.kind || chr(31) || j.concurrency_key)) AS g(by, k)
        WHERE j.status = 'running' AND j.concurrency_key IS NOT NULL
          AND EXISTS (SELECT 1 FROM walked)
          AND (j.kind IN (SELECT name FROM ctl WHERE scope = 'kind' AND max_per_key IS NOT NULL)
               OR j.queue IN (SELECT name FROM ctl
                              WHERE scope = 'queue' AND max_per_key IS NOT NULL))
        GROUP BY 1, 2
    ) AS x
), keys AS (
    -- Each queue starts at its cursor (place 0, not a key walked): every key is found by the
    -- recursive step.
    SELECT w.queue, w.after_key, w.fair, w.after_key AS key, false AS wrapped, 0 AS pos,
           0 AS share, 0 AS total
    FROM walked AS w
    UNION ALL
    SELECT keys.queue, keys.after_key, keys.fair, k.key, k.wrapped, keys.pos + 1, s.share,
           keys.total + s.share
    FROM keys
    CROSS JOIN LATERAL (
    SELECT x.key, x.wrapped FROM (
        (SELECT concurrency_key AS key, keys.wrapped AS wrapped FROM jobs
         WHERE status IN ('queued', 'retrying') AND queue = keys.queue AND concurrency_key IS NOT NULL
           AND concurrency_key > keys.key
         ORDER BY concurrency_key LIMIT 1)
        UNION ALL
        (SELECT concurrency_key, true FROM jobs
         WHERE status IN ('queued', 'retrying') AND queue = keys.queue AND concurrency_key IS NOT NULL
           AND NOT keys.wrapped
         ORDER BY concurrency_key LIMIT 1)
    ) AS x LIMIT 1) AS k
    CROSS JOIN LATERAL (
        SELECT greatest(0, least($4, (
            SELECT least(c.max_per_key - coalesce(
                             (r.by_queue ->> (keys.queue || chr(31) || k.key))::int, 0),
                         c.key_burst)
            FROM ctl AS c, running AS r
            WHERE c.scope = 'queue' AND c.name = keys.queue AND c.per_key),
            CASE WHEN (SELECT cardinality(bounded) > 0 FROM kinds_keyed)
                 THEN (SELECT count(*)::int FROM (
                SELECT 1 FROM jobs AS j
                WHERE j.status IN ('queued', 'retrying') AND j.queue = keys.queue AND j.concurrency_key = k.key
                  AND j.run_at <= now()
                  AND j.kind = ANY((SELECT bounded FROM kinds_keyed)::text[])
                LIMIT greatest(0, coalesce((
                    SELECT max(least(c.max_per_key - coalesce(
                                         (r.by_kind ->> (c.name || chr(31) || k.key))::int, 0),
                                     c.key_burst))
                    FROM ctl AS c, running AS r
                    WHERE c.scope = 'kind' AND c.per_key AND NOT c.paused), $4))
            ) AS due)
                 ELSE 0 END
            -- (Not read when every kind has a bound: an index scan for no kind reads them all.)
            + CASE WHEN (SELECT cardinality(unbounded) > 0 FROM kinds_keyed)
                   THEN (SELECT count(*)::int FROM (
                       SELECT 1 FROM jobs AS j
                       WHERE j.status IN ('queued', 'retrying') AND j.queue = keys.queue AND j.concurrency_key = k.key
                         AND j.run_at <= now()
                         AND j.kind = ANY((SELECT unbounded FROM kinds_keyed)::text[])
                       LIMIT $4
                   ) AS due)
                   ELSE 0 END)) AS share
        OFFSET 0) AS s
    -- Stop at the bound, or once around: back at the keys after the cursor; or, but in a fair
    -- queue (whose keys take turns), once the keys walked can start twice what is asked for
    -- (some will be held by other claims).
    WHERE keys.pos < $9 AND NOT (k.wrapped AND k.key > keys.after_key)
      AND (keys.fair OR keys.total < 2 * $4)
), closed AS (
    -- The kinds and queues whose limit has no room (or bucket no token) as this snapshot
    -- sees them, or that are paused. When every kind or every queue claimed is closed the
    -- claim stops here, without the lock: slots only free up since, so the next claim will
    -- see them.
    SELECT c.scope, c.name, c.paused_at IS NOT NULL AS paused FROM jobq_flow_controls AS c
    WHERE ((c.scope = 'kind' AND c.name = ANY($2::text[]))
           OR (c.scope = 'queue' AND c.name = ANY($3::text[])))
      AND (c.paused_at IS NOT NULL
           OR (c.rate IS NOT NULL
               AND least(c.burst, coalesce(c.tokens, c.burst) + c.rate * greatest(0.0,
        extract(epoch FROM clock_timestamp() - coalesce(c.refilled_at, clock_timestamp()))::float8)) < 1)
           OR c.max_concurrency <= (
               SELECT count(*) FROM jobs AS j
               WHERE j.status = 'running'
                 AND CASE c.scope WHEN 'kind' THEN j.kind ELSE j.queue END = c.name))
), shut AS (
    SELECT NOT EXISTS (SELECT 1 FROM unnest($2::text[]) AS k(kind)
                       WHERE (k.kind) NOT IN (SELECT name FROM closed WHERE scope = 'kind'))
        OR NOT EXISTS (SELECT 1 FROM unnest($3::text[]) AS q(queue)
                       WHERE (q.queue) NOT IN (SELECT name FROM closed WHERE scope = 'queue'))
           AS shut,
           EXISTS (SELECT 1 FROM closed WHERE NOT paused) AS full
)
-- Whether per-key bounds apply at all (then keys are locked), and per key walked the hint of
-- how many of its jobs the claim can start.
SELECT keys.queue, keys.key, keys.pos, shut.shut, shut.full,
       EXISTS (SELECT 1 FROM ctl WHERE per_key AND NOT paused) AS lock_keys,
       keys.share AS room, keys.fair
FROM shut LEFT JOIN keys ON keys.pos > 0
    ) AS x;
    IF is_shut THEN
        -- Every kind or every queue is paused or has no room: nothing to lock for.
        RETURN QUERY SELECT NULL::uuid, NULL::text, NULL::text, NULL::jsonb, NULL::text, NULL::smallint, NULL::integer, NULL::integer, NULL::timestamptz, NULL::text, NULL::boolean, NULL::text, NULL::uuid, NULL::timestamptz, NULL::float8, NULL::text, NULL::jsonb, NULL::jsonb, NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::timestamptz, NULL::text, NULL::jsonb, NULL::jsonb,
            NULL::bigint, NULL::int, NULL::int, is_full, $9 > 0, 0::bigint;
        RETURN;
    END IF;
    SELECT coalesce(array_agg(l.scope), '{}'), coalesce(array_agg(l.name), '{}')
    INTO l_scope, l_name
    FROM (
SELECT scope, name FROM jobq_flow_controls
WHERE limited AND (max_concurrency IS NOT NULL OR rate IS NOT NULL OR fair)
  AND ((scope = 'kind' AND name = ANY($2::text[]))
       OR (scope = 'queue' AND name = ANY($3::text[])))
ORDER BY scope, name
FOR UPDATE
    ) AS l;
    IF lock_keys THEN
        -- The keys to read, in walk order (the queues' keys taking turns), until their hinted
        -- room covers what is asked for, in each queue (in a fair queue, whose keys take
        -- turns, as many as walked): those another claim holds are passed over (it decides
        -- for them), and so are those the hint says are full. A key held elsewhere or full
        -- kept jobs back: try again soon.
        FOR i IN 1 .. cardinality(w_key) LOOP
            EXIT WHEN locked >= 64;
            visited := i;
            queue_hinted := coalesce((hinted ->> w_queue[i])::int, 0);
            IF queue_hinted >= $4 AND NOT w_fair[i] THEN
                w_held := w_held || false;
            ELSIF coalesce(w_room[i], $4) > 0
               AND pg_try_advisory_xact_lock(1785684593, hashtext(w_key[i])) THEN
                w_held := w_held || true;
                locked := locked + 1;
                hinted := hinted
                    || jsonb_build_object(w_queue[i], queue_hinted + coalesce(w_room[i], $4));
            ELSE
                w_held := w_held || false;
                cut := true;
            END IF;
        END LOOP;
        -- Keys past those visited are left to the next claims, as keys past the walk's bound.
        cut := cut OR visited < cardinality(w_key);
        w_queue := w_queue[1:visited];
        w_key := w_key[1:visited];
        w_pos := w_pos[1:visited];
        no_key := pg_try_advisory_xact_lock(1785684593, hashtext(chr(30)));
        cut := cut OR NOT no_key;
    ELSE
        w_held := array_fill(true, ARRAY[cardinality(w_key)]);
    END IF;
    RETURN QUERY
WITH ctl AS (
    -- The bucket refilled up to `at`, at most full. `at` is read now, after the lock was
    -- granted, not at the transaction's start (now()): a claim that began before the previous
    -- holder of the lock but got it after must not move the bucket's time back and be
    -- credited the same interval twice.
    SELECT c.scope, c.name, c.paused_at IS NOT NULL AS paused, c.limited, c.max_concurrency,
           c.max_per_key, c.fair, c.fair_weights, c.rate_per_key, c.burst_per_key, t.at,
           CASE WHEN c.rate IS NOT NULL THEN least(c.burst, coalesce(c.tokens, c.burst) + c.rate * greatest(0.0,
        extract(epoch FROM t.at - coalesce(c.refilled_at, t.at))::float8)) END AS tokens
    FROM jobq_flow_controls AS c
    CROSS JOIN (SELECT clock_timestamp() AS at) AS t
    WHERE (c.scope = 'kind' AND c.name = ANY($2::text[]))
       OR (c.scope = 'queue' AND c.name = ANY($3::text[]))
), running AS (
    -- What holds a slot: every running job of a limited kind or queue, whoever claimed it.
    -- Read by jobs_lease_idx: running jobs only, as many as all workers run at once.
    SELECT j.kind, j.queue, j.concurrency_key AS key, count(*)::int AS n
    FROM jobs AS j
    WHERE j.status = 'running'
      AND (j.kind IN (SELECT name FROM ctl WHERE scope = 'kind' AND limited)
           OR j.queue IN (SELECT name FROM ctl WHERE scope = 'queue' AND limited))
    GROUP BY 1, 2, 3
), room AS (
    -- What each limited kind and queue may start now (0 or less: none); NULL: no bound.
    SELECT ctl.scope, ctl.name, ctl.max_per_key, ctl.fair, ctl.fair_weights, ctl.rate_per_key,
           -- The most jobs of one key it may start in one claim.
           least(ctl.max_per_key, floor(ctl.burst_per_key)::int) AS key_bound,
           floor(ctl.burst_per_key)::int AS key_burst,
           -- A bound declared since the locks were taken (a worker started meanwhile) is not
           -- under one this claim holds: nothing under it this time; the next claim locks it.
           CASE WHEN ((ctl.max_concurrency IS NOT NULL OR ctl.tokens IS NOT NULL)
                      AND (ctl.scope, ctl.name) NOT IN (
                          SELECT l.scope, l.name FROM unnest(l_scope::text[], l_name::text[])
                              AS l(scope, name)))
                     OR ((ctl.max_per_key IS NOT NULL OR ctl.burst_per_key IS NOT NULL)
                         AND NOT lock_keys::bool)
                THEN 0
                ELSE least(ctl.max_concurrency - coalesce(r.n, 0), floor(ctl.tokens)::int)
           END AS free
    FROM ctl
    CROSS JOIN LATERAL (
        SELECT sum(running.n)::int AS n FROM running
        WHERE CASE ctl.scope WHEN 'kind' THEN running.kind ELSE running.queue END = ctl.name
    ) AS r
    WHERE NOT ctl.paused
), open_kinds AS (
    SELECT array_agg(k.kind) AS kinds,
           bool_or(r.key_bound IS NOT NULL) AS per_key
    FROM unnest($2::text[]) AS k(kind)
    LEFT JOIN room AS r ON r.scope = 'kind' AND r.name = k.kind
    WHERE NOT EXISTS (SELECT 1 FROM ctl WHERE scope = 'kind' AND name = k.kind AND paused)
      AND coalesce(r.free, 1) > 0
), open_queues AS (
    -- keyed: jobs are read key by key (fair share or a per-key limit applies).
    SELECT q.queue, least($4, r.free) AS cap, coalesce(r.fair, false) AS fair,
           r.fair_weights AS weights,
           r.max_per_key, r.key_bound, r.key_burst,
           (coalesce(r.fair, false) OR r.key_bound IS NOT NULL
            OR coalesce((SELECT per_key FROM open_kinds), false)) AS keyed
    FROM unnest($3::text[]) AS q(queue)
    LEFT JOIN room AS r ON r.scope = 'queue' AND r.name = q.queue
    WHERE NOT EXISTS (SELECT 1 FROM ctl WHERE scope = 'queue' AND name = q.queue AND paused)
      AND coalesce(r.free, 1) > 0
), key_running AS MATERIALIZED (
    -- The running jobs per (kind, key) and per (queue, key), as two maps: a lookup per key,
    -- not a join of every key to every running key. Jobs without a key count as one more key
    -- (see _MAP_KEY).
    SELECT coalesce((SELECT jsonb_object_agg(x.k, x.n) FROM (
                        SELECT (kind || coalesce(chr(31) || key, chr(30))) AS k, sum(n)::int AS n
                        FROM running GROUP BY 1) AS x), '{}') AS by_kind,
           coalesce((SELECT jsonb_object_agg(x.k, x.n) FROM (
                        SELECT (queue || coalesce(chr(31) || key, chr(30))) AS k, sum(n)::int AS n
                        FROM running GROUP BY 1) AS x), '{}') AS by_queue
), kind_key_bound AS MATERIALIZED (
    -- Whether every kind claimed has a per-key bound (a limit or a rate): then a key's reads
    -- are bounded by what the kinds still let it start.
    SELECT bool_and(r.key_bound IS NOT NULL) AS all_bounded
    FROM unnest((SELECT kinds FROM open_kinds)::text[]) AS k(kind)
    LEFT JOIN room AS r ON r.scope = 'kind' AND r.name = k.kind
), walk AS (
    -- `held`: the claim holds the key's lock (or needs none) and reads its jobs; the others
    -- were passed over, and only move the cursor.
    SELECT * FROM unnest(w_queue::text[], w_key::text[], w_pos::int[], w_held::bool[])
        AS w(queue, key, pos, held)
), key_caps AS MATERIALIZED (
    -- Per key walked and held, how many of its jobs to read at most: what its per-key bounds
    -- still let it start (0: a bound is reached).
    SELECT w.queue, w.key, w.pos, greatest(0, least(
               q.cap,
               q.max_per_key - coalesce((kr.by_queue ->> (w.queue || coalesce(chr(31) || w.key, chr(30))))::int, 0),
               q.key_burst,
               CASE WHEN kb.all_bounded THEN (
                   SELECT max(least(r.max_per_key - coalesce(
                                        (kr.by_kind ->> (k.kind || coalesce(chr(31) || w.key, chr(30))))::int, 0),
                                    r.key_burst))
                   FROM unnest((SELECT kinds FROM open_kinds)::text[]) AS k(kind)
                   JOIN room AS r ON r.scope = 'kind' AND r.name = k.kind) END)) AS cap
    FROM walk AS w
    JOIN open_queues AS q ON q.queue = w.queue AND q.keyed AND w.held
    CROSS JOIN kind_key_bound AS kb
    CROSS JOIN key_running AS kr
), bucket_keys AS (
    -- The keys whose buckets this claim reads and writes: those it holds, and the "no key"
    -- key while it holds that key's lock (jobs without a key share one bucket, as they share
    -- one key's bound). None when it locked no key: a per-key rate declared since starts
    -- nothing this time (see room), and its buckets are another claim's to write.
    SELECT key FROM walk WHERE held AND lock_keys::bool
    UNION
    SELECT chr(30) WHERE no_key::bool AND lock_keys::bool
), key_tokens AS MATERIALIZED (
    -- Under a per-key rate, each such key: its bucket refilled up to `at` (no row: full).
    SELECT ctl.scope, ctl.name, w.key, ctl.at, ctl.rate_per_key, ctl.burst_per_key,
           least(ctl.burst_per_key, coalesce(b.tokens, ctl.burst_per_key) + ctl.rate_per_key * greatest(0.0,
        extract(epoch FROM ctl.at - coalesce(b.refilled_at, ctl.at))::float8)) AS tokens
    FROM ctl
    CROSS JOIN bucket_keys AS w
    LEFT JOIN jobq_flow_key_buckets AS b
        ON b.scope = ctl.scope AND b.name = ctl.name AND b.key = w.key
    WHERE ctl.rate_per_key IS NOT NULL AND NOT ctl.paused
), keyed AS (
    -- Per key, its first due jobs in claim order, no more than the key can still start: read,
    -- not locked (the rows picked are locked below). `rk`: each one's turn within its key.
    SELECT d.*, kc.pos, row_number() OVER (
               PARTITION BY d.queue, d.key ORDER BY d.priority, d.run_at, d.id) AS rk
    FROM key_caps AS kc
    CROSS JOIN LATERAL (
        SELECT j.id, j.kind, j.queue, j.concurrency_key AS key, j.priority, j.run_at
        FROM jobs AS j
        WHERE j.status IN ('queued', 'retrying') AND j.queue = kc.queue
          AND j.concurrency_key = kc.key AND j.run_at <= now()
          AND j.kind = ANY((SELECT kinds FROM open_kinds)::text[])
        ORDER BY j.priority, j.run_at, j.id
        LIMIT kc.cap
    ) AS d
), keyless AS MATERIALIZED (
    -- In a keyed queue, the jobs without a key among its first $4 due jobs of the kinds this
    -- claim may start, in claim order (`rn`): they take turns as one more key, walked first.
    -- Jobs of other kinds (paused, full, or no handler here) are passed over as the plain
    -- claim passes them; they must not hide the jobs behind them.
    SELECT a.*,
           row_number() OVER (PARTITION BY a.queue ORDER BY a.priority, a.run_at, a.id) AS rn,
           row_number() OVER (PARTITION BY a.queue, a.kind ORDER BY a.priority, a.run_at, a.id)
               AS rn_kind
    FROM open_queues AS q
    CROSS JOIN LATERAL (
        SELECT h.id, h.kind, h.queue, h.concurrency_key AS key, h.priority, h.run_at
        FROM jobs AS h
        WHERE h.status IN ('queued', 'retrying') AND h.queue = q.queue AND h.run_at <= now()
          AND h.kind = ANY((SELECT kinds FROM open_kinds)::text[])
        ORDER BY h.priority, h.run_at, h.id
        LIMIT $4
    ) AS a
    WHERE q.keyed AND no_key::bool AND a.key IS NULL
), no_key_caps AS MATERIALIZED (
    -- How many of those the "no key" key can still start, as key_caps for the keys walked,
    -- its bucket's tokens too: per keyed queue (`cap`), and per kind with a per-key bound (in
    -- no_key_kind_caps). Candidates a bound turns down still take places in the claim: a
    -- backlog without a key must not take them all from the keyed jobs behind it.
    SELECT q.queue, greatest(0, least(
               q.cap,
               q.max_per_key - coalesce(
                   (kr.by_queue ->> (q.queue || coalesce(chr(31) || NULL, chr(30))))::int, 0),
               q.key_burst,
               (SELECT floor(t.tokens)::int FROM key_tokens AS t
                WHERE t.scope = 'queue' AND t.name = q.queue AND t.key = chr(30)))) AS cap
    FROM open_queues AS q
    CROSS JOIN key_running AS kr
    WHERE q.keyed AND no_key::bool
), no_key_kind_caps AS MATERIALIZED (
    SELECT r.name AS kind,
           greatest(0, least(
               r.max_per_key - coalesce(
                   (kr.by_kind ->> (r.name || coalesce(chr(31) || NULL, chr(30))))::int, 0),
               r.key_burst,
               (SELECT floor(t.tokens)::int FROM key_tokens AS t
                WHERE t.scope = 'kind' AND t.name = r.name AND t.key = chr(30)))) AS cap
    FROM room AS r
    CROSS JOIN key_running AS kr
    WHERE r.scope = 'kind' AND r.key_bound IS NOT NULL AND no_key::bool
), unkeyed AS (
    -- Those the "no key" key can start.
    SELECT k.id, k.kind, k.queue, k.key, k.priority, k.run_at, 0 AS pos, 1::bigint AS rk
    FROM keyless AS k
    JOIN no_key_caps AS nk ON nk.queue = k.queue
    LEFT JOIN no_key_kind_caps AS nkk ON nkk.kind = k.kind
    WHERE k.rn <= nk.cap AND (nkk.cap IS NULL OR k.rn_kind <= nkk.cap)
), plain AS (
    -- An unkeyed queue: its jobs in claim order, skipping rows other claims hold (jobs of
    -- kinds no limit covers may be claimed by anyone).
    SELECT d.*, 0 AS pos, 1::bigint AS rk
    FROM open_queues AS q
    CROSS JOIN LATERAL (
        SELECT j.id, j.kind, j.queue, j.concurrency_key AS key, j.priority, j.run_at
        FROM jobs AS j
        WHERE j.status IN ('queued', 'retrying') AND j.queue = q.queue AND j.run_at <= now()
          AND j.kind = ANY((SELECT kinds FROM open_kinds)::text[])
        ORDER BY j.priority, j.run_at, j.id
        LIMIT q.cap
        FOR UPDATE SKIP LOCKED
    ) AS d
    WHERE NOT q.keyed
), candidates AS (
    SELECT c.id, c.kind, c.queue, c.key, c.priority, c.run_at, c.pos AS walked,
           -- A key of weight w: its first w jobs take turn 1, the next w turn 2, ...
           CASE WHEN q.fair
                THEN ceil(c.rk / coalesce((q.weights ->> c.key)::float8, 1))::bigint
                ELSE 1 END AS turn,
           CASE WHEN q.fair THEN c.pos ELSE 0 END AS pos,
           coalesce((kr.by_kind ->> (c.kind || coalesce(chr(31) || c.key, chr(30))))::int, 0)
               AS kind_key_running,
           coalesce((kr.by_queue ->> (c.queue || coalesce(chr(31) || c.key, chr(30))))::int, 0)
               AS queue_key_running
    FROM (SELECT * FROM keyed UNION ALL SELECT * FROM unkeyed UNION ALL SELECT * FROM plain) AS c
    JOIN open_queues AS q ON q.queue = c.queue
    CROSS JOIN key_running AS kr
), shape AS MATERIALIZED (
    -- Which ranks the bounds of this claim read: a rank no bound reads is not computed (each
    -- is a sort of the candidates), and is 1 instead.
    SELECT EXISTS (SELECT 1 FROM room WHERE free IS NOT NULL) AS free,
           EXISTS (SELECT 1 FROM room WHERE scope = 'kind' AND key_bound IS NOT NULL) AS kind_keys,
           EXISTS (SELECT 1 FROM room WHERE scope = 'queue' AND key_bound IS NOT NULL)
               AS queue_keys
), ranked AS (
    -- Each candidate's place under every bound it falls under, in claim order; under a per-key
    -- bound, counted after the jobs of its key that run now. A candidate turned down by one
    -- bound still takes a place under the others: a claim may take fewer than it could, never
    -- more. Of the three branches one runs, by the claim's bounds (the others' filters are
    -- false before they read a row).
    SELECT c.*,
           row_number() OVER (ORDER BY turn, priority, pos, run_at, id) AS n_all,
           row_number() OVER (PARTITION BY c.kind ORDER BY turn, priority, pos, run_at, id) AS n_kind,
           row_number() OVER (PARTITION BY c.queue ORDER BY turn, priority, pos, run_at, id) AS n_queue,
           row_number() OVER (PARTITION BY c.kind, c.key ORDER BY turn, priority, pos, run_at, id) AS s_kind_key,
           row_number() OVER (PARTITION BY c.queue, c.key ORDER BY turn, priority, pos, run_at, id) AS s_queue_key
    FROM candidates AS c
    WHERE (SELECT free OR (kind_keys AND queue_keys) FROM shape)
    UNION ALL
    SELECT c.*,
           row_number() OVER (ORDER BY turn, priority, pos, run_at, id) AS n_all,
           1::bigint AS n_kind,
           1::bigint AS n_queue,
           row_number() OVER (PARTITION BY c.kind, c.key ORDER BY turn, priority, pos, run_at, id) AS s_kind_key,
           1::bigint AS s_queue_key
    FROM candidates AS c
    WHERE (SELECT NOT free AND NOT queue_keys FROM shape)
    UNION ALL
    SELECT c.*,
           row_number() OVER (ORDER BY turn, priority, pos, run_at, id) AS n_all,
           1::bigint AS n_kind,
           1::bigint AS n_queue,
           1::bigint AS s_kind_key,
           row_number() OVER (PARTITION BY c.queue, c.key ORDER BY turn, priority, pos, run_at, id) AS s_queue_key
    FROM candidates AS c
    WHERE (SELECT NOT free AND queue_keys AND NOT kind_keys FROM shape)
), picked AS (
    SELECT r.id, r.turn, r.pos, r.walked
    FROM ranked AS r
    LEFT JOIN room AS rk ON rk.scope = 'kind' AND rk.name = r.kind
    LEFT JOIN room AS rq ON rq.scope = 'queue' AND rq.name = r.queue
    LEFT JOIN key_tokens AS tk ON tk.scope = 'kind' AND tk.name = r.kind
        AND tk.key = coalesce(r.key, chr(30))
    LEFT JOIN key_tokens AS tq ON tq.scope = 'queue' AND tq.name = r.queue
        AND tq.key = coalesce(r.key, chr(30))
    WHERE r.n_all <= $4
      AND (rk.free IS NULL OR r.n_kind <= rk.free)
      AND (rq.free IS NULL OR r.n_queue <= rq.free)
      -- Jobs without a key share one key's bound (PARTITION BY groups them as one key).
      AND (rk.max_per_key IS NULL OR r.kind_key_running + r.s_kind_key <= rk.max_per_key)
      AND (rq.max_per_key IS NULL OR r.queue_key_running + r.s_queue_key <= rq.max_per_key)
      AND (tk.tokens IS NULL OR r.s_kind_key <= floor(tk.tokens))
      AND (tq.tokens IS NULL OR r.s_queue_key <= floor(tq.tokens))
), locked AS (
    -- Only the rows picked are locked. A row another claim took meanwhile (or one cancelled)
    -- is skipped: this claim then takes fewer jobs, never more.
    SELECT j.id, p.turn, p.pos, p.walked FROM jobs AS j JOIN picked AS p ON p.id = j.id
    WHERE j.status IN ('queued', 'retrying')
    ORDER BY j.id
    FOR UPDATE OF j SKIP LOCKED
), claimed AS (
    UPDATE jobs AS j
    SET status = 'running',
    attempts = j.attempts + 1,
    max_attempts = coalesce(
        j.max_attempts,
        (SELECT m.n FROM unnest($6::text[], $7::int[]) AS m(kind, n) WHERE m.kind = j.kind),
        $8),
    started_at = now(),
    updated_at = now(),
    lease_owner = $1,
    lease_token = gen_random_uuid(),
    lease_expires_at = now() + make_interval(secs => $5)
    FROM locked
    WHERE j.id = locked.id
    RETURNING j.id, j.kind, j.queue, j.payload, j.status, j.priority, j.attempts, j.max_attempts, j.run_at, j.idempotency_key, j.cancel_requested, j.lease_owner, j.lease_token, j.lease_expires_at, j.retry_delay_seconds, NULL::text AS last_error, '[]'::jsonb AS errors, NULL::jsonb AS result, j.created_at, j.updated_at, j.started_at, j.finished_at, j.concurrency_key, j.progress, j.trace_context, locked.turn AS _turn, locked.pos AS _pos,
              locked.walked AS _walked
), spent AS (
    -- Tokens taken by this claim; the bucket's time moves to `at` (never back).
    UPDATE jobq_flow_controls AS c
    SET tokens = ctl.tokens - (
            SELECT count(*) FROM claimed AS x
            WHERE CASE c.scope WHEN 'kind' THEN x.kind ELSE x.queue END = c.name),
        refilled_at = greatest(c.refilled_at, ctl.at)
    FROM ctl
    WHERE c.scope = ctl.scope AND c.name = ctl.name AND ctl.tokens IS NOT NULL
      AND NOT ctl.paused
    RETURNING 1
), key_spent AS (
    -- Tokens each key's bucket paid for this claim's starts, its time moved to `at`.
    INSERT INTO jobq_flow_key_buckets AS b (scope, name, key, tokens, refilled_at)
    SELECT t.scope, t.name, t.key, t.tokens - count(*), t.at
    FROM key_tokens AS t
    JOIN claimed AS x ON coalesce(x.concurrency_key, chr(30)) = t.key
        AND CASE t.scope WHEN 'kind' THEN x.kind ELSE x.queue END = t.name
    GROUP BY t.scope, t.name, t.key, t.tokens, t.at
    ORDER BY t.scope, t.name, t.key
    ON CONFLICT (scope, name, key) DO UPDATE
        SET tokens = excluded.tokens, refilled_at = greatest(b.refilled_at, excluded.refilled_at)
    RETURNING 1
), key_pruned AS (
    -- Buckets refilled since (a full bucket is no row): of the keys this claim holds (another
    -- claim may be writing the others' buckets), none it just wrote.
    DELETE FROM jobq_flow_key_buckets AS b
    WHERE (b.scope, b.name, b.key) IN (
        SELECT o.scope, o.name, o.key
        FROM ctl JOIN jobq_flow_key_buckets AS o ON o.scope = ctl.scope AND o.name = ctl.name
        WHERE ctl.rate_per_key IS NOT NULL AND NOT ctl.paused
          AND o.key IN (SELECT key FROM bucket_keys)
          AND least(ctl.burst_per_key, coalesce(o.tokens, ctl.burst_per_key) + ctl.rate_per_key * greatest(0.0,
        extract(epoch FROM ctl.at - coalesce(o.refilled_at, ctl.at))::float8))
              >= ctl.burst_per_key
          AND NOT EXISTS (SELECT 1 FROM claimed AS x
                          WHERE coalesce(x.concurrency_key, chr(30)) = o.key)
        LIMIT 16)
    RETURNING 1
), cursor_to AS (
    -- The next claim's walk starts after the last key this one took a job from, when it took
    -- all it asked for; else after the last key it walked.
    SELECT w.queue, w.key
    FROM (SELECT w.queue, CASE WHEN (SELECT count(*) FROM claimed) >= $4
                               THEN (SELECT max(x._walked) FROM claimed AS x
                                     WHERE x.queue = w.queue AND x._walked > 0)
                               ELSE max(w.pos) END AS pos
          FROM walk AS w GROUP BY w.queue) AS t
    JOIN walk AS w ON w.queue = t.queue AND w.pos = t.pos
), moved AS (
    -- Unless another claim is moving the queue's cursor now: the cursor is where walks start,
    -- not a bound, and claims of other keys must not wait for each other here.
    UPDATE jobq_flow_cursors AS cur SET after_key = t.key, updated_at = now()
    FROM cursor_to AS t
    WHERE cur.queue = t.queue
      AND cur.queue IN (SELECT c.queue FROM jobq_flow_cursors AS c
                        WHERE c.queue IN (SELECT queue FROM cursor_to)
                        ORDER BY c.queue
                        FOR UPDATE SKIP LOCKED)
    RETURNING 1
), cursor_added AS (
    -- A queue's first cursor: by one claim (the others would wait for its insert's commit).
    INSERT INTO jobq_flow_cursors (queue, after_key)
    SELECT t.queue, t.key FROM cursor_to AS t
    WHERE NOT EXISTS (SELECT 1 FROM jobq_flow_cursors AS c WHERE c.queue = t.queue)
      AND pg_try_advisory_xact_lock(1785684594, hashtext(t.queue))
    ORDER BY t.queue
    ON CONFLICT (queue) DO NOTHING
    RETURNING 1
), held AS (
    -- Whether a bound kept back jobs this claim could otherwise have taken: then the worker
    -- tries again soon (slots and tokens free up without a NOTIFY); else, like the plain
    -- claim, it waits for a NOTIFY or the poll.
    SELECT cut::bool
        OR EXISTS (SELECT 1 FROM key_caps WHERE cap = 0)
        OR (SELECT count(*) FROM keyless) > (SELECT count(*) FROM unkeyed)
        OR (SELECT count(*) FROM candidates) > (SELECT count(*) FROM picked)
        OR EXISTS (SELECT 1 FROM open_queues AS q
                   WHERE NOT q.keyed AND q.cap < $4
                     AND (SELECT count(*) FROM plain AS p WHERE p.queue = q.queue) >= q.cap)
        OR (EXISTS (SELECT 1 FROM room WHERE free <= 0)
            AND EXISTS (
                SELECT 1 FROM jobs AS j
                WHERE j.status IN ('queued', 'retrying') AND j.queue = ANY($3::text[]) AND j.kind = ANY($2::text[])
                  AND j.run_at <= now()
                  AND (j.kind IN (SELECT name FROM room WHERE scope = 'kind' AND free <= 0)
                       OR j.queue IN (SELECT name FROM room WHERE scope = 'queue' AND free <= 0))
            )) AS held
)
SELECT claimed.id, claimed.kind, claimed.queue, claimed.payload, claimed.status, claimed.priority, claimed.attempts, claimed.max_attempts, claimed.run_at, claimed.idempotency_key, claimed.cancel_requested, claimed.lease_owner, claimed.lease_token, claimed.lease_expires_at, claimed.retry_delay_seconds, claimed.last_error, claimed.errors, claimed.result, claimed.created_at, claimed.updated_at, claimed.started_at, claimed.finished_at, claimed.concurrency_key, claimed.progress, claimed.trace_context,
       claimed._turn::bigint, claimed._pos::int, claimed._walked::int, held.held AS _held,
       EXISTS (SELECT 1 FROM ctl WHERE NOT paused
                   AND (max_per_key IS NOT NULL OR rate_per_key IS NOT NULL
                        OR (scope = 'queue' AND fair))) AS _keyed,
       ((SELECT count(*) FROM spent) + (SELECT count(*) FROM moved)
       + (SELECT count(*) FROM cursor_added)
       + (SELECT count(*) FROM key_spent) + (SELECT count(*) FROM key_pruned))::bigint AS _written
FROM held LEFT JOIN claimed ON true;
END
$fn$;
