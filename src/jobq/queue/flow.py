"""Flow control: paused queues and kinds, concurrency limits, rate limits and fair share.

The state lives in `jobq_flow_controls`, one row per queue or kind that is paused or limited.
The plain claim (`jobq.queue.leases`) leaves every such queue and kind out; the limited claim
here takes them, honouring every limit in the claim itself. Design, correctness argument and
ordering guarantee: docs/flow-control.md.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from jobq.queue.leases import _CLAIM_RETURNING, _LEASE
from jobq.queue.model import _JOB_FIELDS, InvalidJob, Job
from jobq.queue.validation import NOT_PRINTABLE, _check_name, check_concurrency_key
from jobq.queue.views import Views

SCOPES = ("queue", "kind")

_RATE = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$", re.IGNORECASE
)
_PER_SECOND = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hour": 3600.0}  # fmt: skip


def parse_rate(text: object, field: str = "rate_limit") -> float:
    """Jobs per second from "100/s", "30/min", "1000/h"; ValueError (naming `field`) for
    anything else."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{field} must look like '100/s', '30/min' or '1000/h', got {text!r}")
    count = float(match[1])
    if not count > 0 or not math.isfinite(count):
        raise ValueError(f"{field} must allow more than 0 jobs, got {text!r}")
    rate = count / _PER_SECOND[match[2].lower()]
    # The claim counts a bucket's tokens as an integer: a larger rate would fail every claim
    # of every worker that shares the limit, not this declaration.
    if rate > _INT4_MAX:
        raise ValueError(f"{field} must be at most {_INT4_MAX}/s, got {text!r}")
    return rate


def _rate_and_burst(
    field: str, text: str | None, burst_field: str, burst: int | None
) -> tuple[float | None, float | None]:
    """A declared rate (`field`) and its bucket size (`burst_field`, by default one second's
    worth): starts per second and the bucket, or None and None without a rate."""
    rate = None if text is None else parse_rate(text, field)
    if burst is not None and rate is None:
        raise ValueError(f"{burst_field} needs a {field}")
    return rate, None if rate is None else float(burst or default_burst(rate))


def default_burst(rate: float) -> float:
    """The bucket size when none is given: one second's worth of starts, at least one."""
    return max(1.0, math.floor(rate))


_INT4_MAX = 2**31 - 1
MAX_FAIR_WEIGHT = 1000


def _weights(weights: object, fair: bool) -> tuple[tuple[str, int], ...] | None:
    if weights is None:
        return None
    if not fair:
        raise ValueError("fair_weights needs fair=True")
    if not isinstance(weights, Mapping):
        raise ValueError(f"fair_weights must map concurrency keys to weights, got {weights!r}")
    out = []
    for key, weight in sorted(weights.items()):
        try:
            check_concurrency_key(key)
        except InvalidJob as exc:
            raise ValueError(f"fair_weights: a key {exc.message}, got {key!r}") from None
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValueError(f"fair_weights: the weight of {key!r} must be an integer")
        if not 1 <= weight <= MAX_FAIR_WEIGHT:
            raise ValueError(
                f"fair_weights: the weight of {key!r} must be from 1 to {MAX_FAIR_WEIGHT}"
            )
        out.append((key, weight))
    return tuple(out)


def _positive(name: str, value: object) -> int | None:
    if value is None:
        return None
    # The limit columns are integers: a larger value would fail the worker's start-up instead.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _INT4_MAX:
        raise ValueError(f"{name} must be an integer from 1 to {_INT4_MAX}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Limits:
    """What a handler (for its kind) or a queue declares. None: no such bound."""

    max_concurrency: int | None = None
    max_per_key: int | None = None
    rate: float | None = None  # jobs per second
    burst: float | None = None
    fair: bool = False
    # Where a job's concurrency key comes from: a path into its payload (a field's name, or
    # the names down to a nested one), derived by the database at every insert. Not a limit:
    # `any` ignores it.
    key_path: tuple[str, ...] | None = None
    # Every concurrency key's own token bucket: starts per second, bucket size.
    rate_per_key: float | None = None
    burst_per_key: float | None = None
    # Fair queues: (key, weight) pairs, a key with weight w gets w turns per round.
    fair_weights: tuple[tuple[str, int], ...] | None = None

    @classmethod
    def declare(
        cls,
        *,
        max_concurrency: int | None = None,
        max_per_key: int | None = None,
        rate_limit: str | None = None,
        rate_burst: int | None = None,
        fair: bool = False,
        rate_limit_per_key: str | None = None,
        rate_burst_per_key: int | None = None,
        fair_weights: Mapping[str, int] | None = None,
    ) -> Limits:
        """Checked declarations: ValueError naming the bad argument."""
        _positive("max_concurrency", max_concurrency)
        _positive("max_per_key", max_per_key)
        _positive("rate_burst", rate_burst)
        _positive("rate_burst_per_key", rate_burst_per_key)
        if not isinstance(fair, bool):
            raise ValueError(f"fair must be True or False, got {fair!r}")
        rate, burst = _rate_and_burst("rate_limit", rate_limit, "rate_burst", rate_burst)
        per_key, burst_per_key = _rate_and_burst(
            "rate_limit_per_key", rate_limit_per_key, "rate_burst_per_key", rate_burst_per_key
        )
        return cls(
            max_concurrency, max_per_key, rate, burst, fair,
            rate_per_key=per_key, burst_per_key=burst_per_key,
            fair_weights=_weights(fair_weights, fair),
        )  # fmt: skip

    @property
    def any(self) -> bool:
        return bool(
            self.max_concurrency
            or self.max_per_key
            or self.rate is not None
            or self.fair
            or self.rate_per_key is not None
        )


@dataclass(frozen=True, slots=True)
class FlowState:
    """A queue's or kind's row of jobq_flow_controls as operators see it."""

    scope: str
    name: str
    paused: bool
    paused_at: datetime | None
    max_concurrency: int | None
    max_per_key: int | None
    rate: float | None
    burst: float | None
    fair: bool
    rate_per_key: float | None = None
    burst_per_key: float | None = None
    # Who paused it, as the pause said (`Flow.pause(by=...)`, the API's `{"by": ...}`).
    paused_by: str | None = None

    @classmethod
    def from_record(cls, r: Any) -> FlowState:
        return cls(
            r["scope"],
            r["name"],
            r["paused_at"] is not None,
            r["paused_at"],
            r["max_concurrency"],
            r["max_per_key"],
            r["rate"],
            r["burst"],
            r["fair"],
            r["rate_per_key"],
            r["burst_per_key"],
            r["paused_by"],
        )

    @classmethod
    def unset(cls, scope: str, name: str) -> FlowState:
        return cls(scope, name, False, None, None, None, None, None, False)


@dataclass(frozen=True, slots=True)
class QueueInfo:
    queue: str
    state: FlowState
    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class LimitedClaim:
    """What a limited claim took, and whether a bound kept back more it could have taken."""

    jobs: list[Job]
    held_back: bool
    # Whether a keyed queue (fair share or a per-key limit) is among those claimed: whether
    # the next claim needs the key walk.
    keyed: bool = True


@dataclass(frozen=True, slots=True)
class LimitUsage:
    """A limited queue or kind: its limits and what runs under them now."""

    state: FlowState
    running: int
    tokens: float | None
    # The keys with running jobs, most running first (at most 20).
    keys: list[tuple[str, int]]


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise InvalidJob("scope", f"must be one of {', '.join(SCOPES)}")
    return scope


_STATE_COLUMNS = (
    "scope, name, paused_at, max_concurrency, max_per_key, rate, burst, fair, rate_per_key,"
    " burst_per_key, paused_by"
)
MAX_PAUSED_BY_LENGTH = 200


def check_paused_by(by: object) -> str | None:
    """Who pauses, as stored and shown (in a terminal too): printable, bounded."""
    if by is None:
        return None
    if not isinstance(by, str) or not 1 <= len(by) <= MAX_PAUSED_BY_LENGTH:
        raise InvalidJob("by", f"must be a string of 1 to {MAX_PAUSED_BY_LENGTH} characters")
    if not by.isprintable():
        raise InvalidJob("by", NOT_PRINTABLE)
    return by


# A name already paused is paused again (idempotent) whatever the count; a new pause only
# while fewer than $4 are paused. Concurrent new pauses each count before the others commit,
# so the bound can be passed by as many pauses as are made at the same moment.
_PAUSE = f"""
INSERT INTO jobq_flow_controls AS c (scope, name, paused_at, paused_by)
SELECT $1, $2, now(), $3
WHERE $4::int IS NULL
   OR EXISTS (SELECT 1 FROM jobq_flow_controls
              WHERE scope = $1 AND name = $2 AND paused_at IS NOT NULL)
   OR (SELECT count(*) FROM jobq_flow_controls WHERE paused_at IS NOT NULL) < $4::int
ON CONFLICT (scope, name) DO UPDATE
    SET paused_at = coalesce(c.paused_at, now()), paused_by = coalesce(c.paused_by, $3)
RETURNING {_STATE_COLUMNS}
"""

# A row that neither pauses nor limits anything is removed: the table stays as small as what
# is configured.
_RESUME = f"""
UPDATE jobq_flow_controls SET paused_at = NULL, paused_by = NULL
WHERE scope = $1 AND name = $2
RETURNING {_STATE_COLUMNS}, limited
"""

# A row that neither pauses nor limits anything is removed: the table stays as small as what
# is configured.
_DROP_UNUSED = """
DELETE FROM jobq_flow_controls
WHERE scope = $1 AND name = $2 AND paused_at IS NULL AND NOT limited AND key_path IS NULL
"""

# A row holding only a key path is neither paused nor limited: not a state operators see.
_STATES = f"""
SELECT {_STATE_COLUMNS} FROM jobq_flow_controls WHERE paused_at IS NOT NULL OR limited
ORDER BY scope, name
"""

# A worker's declaration replaces what is stored for its kinds and queues (the last worker to
# start wins), and keeps a pause. The bucket starts full; it is kept while the rate stays.
_DECLARE = """
WITH d AS (
    SELECT d.scope, d.name, d.mc, d.mk, d.rate, d.burst, d.fair, d.rpk, d.bpk,
           CASE WHEN d.kp IS NOT NULL
                THEN ARRAY(SELECT jsonb_array_elements_text(d.kp::jsonb)) END AS kp,
           d.fw::jsonb AS fw
    FROM unnest($1::text[], $2::text[], $3::int[], $4::int[], $5::float8[], $6::float8[],
                $7::bool[], $9::text[], $10::float8[], $11::float8[], $12::text[])
         AS d(scope, name, mc, mk, rate, burst, fair, kp, rpk, bpk, fw)
), rebucketed AS (
    -- A per-key rate declared anew starts every key's bucket full.
    DELETE FROM jobq_flow_key_buckets AS b
    USING d, jobq_flow_controls AS c
    WHERE b.scope = d.scope AND b.name = d.name AND c.scope = d.scope AND c.name = d.name
      AND (c.rate_per_key IS DISTINCT FROM d.rpk OR c.burst_per_key IS DISTINCT FROM d.bpk)
    RETURNING 1
), upserted AS (
    INSERT INTO jobq_flow_controls AS c (scope, name, max_concurrency, max_per_key, rate, burst,
                                         fair, tokens, refilled_at, declared_by, declared_at,
                                         key_path, rate_per_key, burst_per_key, fair_weights)
    SELECT scope, name, mc, mk, rate, burst, fair, burst, now(), $8, now(), kp, rpk, bpk, fw
    FROM d WHERE mc IS NOT NULL OR mk IS NOT NULL OR rate IS NOT NULL OR fair OR kp IS NOT NULL
                 OR rpk IS NOT NULL
    ORDER BY scope, name
    ON CONFLICT (scope, name) DO UPDATE
        SET max_concurrency = excluded.max_concurrency, max_per_key = excluded.max_per_key,
            fair = excluded.fair, declared_by = excluded.declared_by, declared_at = now(),
            key_path = excluded.key_path, rate_per_key = excluded.rate_per_key,
            burst_per_key = excluded.burst_per_key, fair_weights = excluded.fair_weights,
            tokens = CASE WHEN c.rate IS NOT DISTINCT FROM excluded.rate
                          AND c.burst IS NOT DISTINCT FROM excluded.burst
                          THEN c.tokens ELSE excluded.burst END,
            refilled_at = CASE WHEN c.rate IS NOT DISTINCT FROM excluded.rate
                               AND c.burst IS NOT DISTINCT FROM excluded.burst
                               THEN c.refilled_at ELSE now() END,
            rate = excluded.rate, burst = excluded.burst
    RETURNING 1
), cleared AS (
    UPDATE jobq_flow_controls AS c
    SET max_concurrency = NULL, max_per_key = NULL, rate = NULL, burst = NULL, fair = false,
        tokens = NULL, refilled_at = NULL, key_path = NULL, rate_per_key = NULL,
        burst_per_key = NULL, fair_weights = NULL, declared_by = $8, declared_at = now()
    FROM d
    WHERE c.scope = d.scope AND c.name = d.name AND (c.limited OR c.key_path IS NOT NULL)
      AND d.mc IS NULL AND d.mk IS NULL AND d.rate IS NULL AND NOT d.fair AND d.kp IS NULL
      AND d.rpk IS NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM upserted) + (SELECT count(*) FROM cleared)
       + (SELECT count(*) FROM rebucketed)
"""

# Rows left with neither a pause nor a limit after a declaration cleared them.
_DROP_EMPTY = """
DELETE FROM jobq_flow_controls
WHERE scope = ANY($1::text[]) AND name = ANY($2::text[]) AND paused_at IS NULL AND NOT limited
  AND key_path IS NULL
"""

_APPLIES = """
SELECT EXISTS (
    SELECT 1 FROM jobq_flow_controls
    WHERE limited AND ((scope = 'kind' AND name = ANY($1::text[]))
                       OR (scope = 'queue' AND name = ANY($2::text[])))
)
"""

# Whether every kind, or every queue, of these is limited: then the plain claim has nothing
# to take from them.
_ALL_LIMITED = """
SELECT (SELECT count(*) FROM jobq_flow_controls
        WHERE limited AND scope = 'kind' AND name = ANY($1::text[]))
           = cardinality(ARRAY(SELECT DISTINCT unnest($1::text[])))
    OR (SELECT count(*) FROM jobq_flow_controls
        WHERE limited AND scope = 'queue' AND name = ANY($2::text[]))
           = cardinality(ARRAY(SELECT DISTINCT unnest($2::text[])))
"""

# Both, in one round trip (each worker asks once a second).
_COVER = f"SELECT ({_APPLIES.strip()}) AS applies, ({_ALL_LIMITED.strip()}) AS covered"


def _refilled(*, burst: str, tokens: str, rate: str, refilled_at: str, at: str) -> str:
    """SQL: a token bucket's tokens at `at`: `tokens` left at `refilled_at` plus `rate` per
    second since, at most `burst`. No tokens stored yet: a full bucket; a clock read before
    `refilled_at` adds none."""
    return (
        f"least({burst}, coalesce({tokens}, {burst}) + {rate} * greatest(0.0,\n"
        f"        extract(epoch FROM {at} - coalesce({refilled_at}, {at}))::float8))"
    )


# A limit's bucket (a row c of jobq_flow_controls) at {at}; a key's bucket under limit ctl at
# ctl.at.
_RATE_TOKENS = _refilled(
    burst="c.burst", tokens="c.tokens", rate="c.rate", refilled_at="c.refilled_at", at="{at}"
)
_KEY_TOKENS = _refilled(
    burst="ctl.burst_per_key", tokens="{tokens}", rate="ctl.rate_per_key",
    refilled_at="{refilled_at}", at="ctl.at",
)  # fmt: skip

# How many concurrency keys one limited claim visits per keyed queue, at most. A claim's cost
# (and the time it holds the limit's row lock) is bounded by it, not by the number of keys
# waiting; successive claims continue from where the last one stopped (jobq_flow_cursors).
KEY_WALK = 128

_WAITING = "status IN ('queued', 'retrying')"

# The first key of queue {queue} after {after} (or, unless {wrapped}, the smallest key: the walk
# wraps around once): a probe of jobs_queue_key_claim_idx.
_NEXT_KEY = f"""
    SELECT x.key, x.wrapped FROM (
        (SELECT concurrency_key AS key, {{wrapped}} AS wrapped FROM jobs
         WHERE {_WAITING} AND queue = {{queue}} AND concurrency_key IS NOT NULL
           AND concurrency_key > {{after}}
         ORDER BY concurrency_key LIMIT 1)
        UNION ALL
        (SELECT concurrency_key, true FROM jobs
         WHERE {_WAITING} AND queue = {{queue}} AND concurrency_key IS NOT NULL
           AND NOT {{wrapped}}
         ORDER BY concurrency_key LIMIT 1)
    ) AS x LIMIT 1"""

# A hint of how many jobs of key k.key in queue {queue} a claim can start: its due jobs of the
# kinds with a per-key bound, no more than the most those bounds still let it start (their
# limits less its running jobs, their buckets' size), and of the other kinds; in all no more
# than the queue's per-key bounds allow, and at most $4 (what the claim asks for).
_KEY_SHARE = f"""
        SELECT greatest(0, least($4, (
            SELECT least(c.max_per_key - coalesce(
                             (r.by_queue ->> ({{queue}} || chr(31) || k.key))::int, 0),
                         c.key_burst)
            FROM ctl AS c, running AS r
            WHERE c.scope = 'queue' AND c.name = {{queue}} AND c.per_key),
            CASE WHEN (SELECT cardinality(bounded) > 0 FROM kinds_keyed)
                 THEN (SELECT count(*)::int FROM (
                SELECT 1 FROM jobs AS j
                WHERE j.{_WAITING} AND j.queue = {{queue}} AND j.concurrency_key = k.key
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
                       WHERE j.{_WAITING} AND j.queue = {{queue}} AND j.concurrency_key = k.key
                         AND j.run_at <= now()
                         AND j.kind = ANY((SELECT unbounded FROM kinds_keyed)::text[])
                       LIMIT $4
                   ) AS due)
                   ELSE 0 END)) AS share
        OFFSET 0"""
_STEP_KEY = _NEXT_KEY.format(queue="keys.queue", after="keys.key", wrapped="keys.wrapped")

# The advisory lock class (the first of the two keys) of concurrency keys' locks; the second
# is the key's hashtext (jobs without a key: that of chr(30), which no key holds). Two keys
# whose hashes collide only take turns. "jobq" in ASCII.
KEY_LOCK_CLASS = 0x6A6F6271
# That of the lock a claim takes to insert a queue's first cursor (jobq_flow_cursors).
CURSOR_LOCK_CLASS = KEY_LOCK_CLASS + 1
# The most keys one claim locks: with at most this many at once per claim, many workers'
# claims fit the server's lock table (max_locks_per_transaction x max_connections entries).
KEY_LOCKS = 64

# The limited claim is three statements, run by one function (claim_limited_function). The
# first (this one) finds, for every keyed queue (fair share or a per-key limit applies), the
# keys the claim will consider: a loose index scan of jobs_queue_key_claim_idx, one probe per
# key, starting after the key the previous claim stopped at and wrapping around once, at most
# $9 keys. It takes no lock: which keys have waiting jobs is only a hint (the claim reads
# their jobs again below).
# Written in the function's arguments: $2 kinds, $3 queues, $9 the walk's bound, $4 how many
# jobs the claim asks for.
_WALK_KEYS = f"""
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
    SELECT coalesce(array_agg(k.kind) FILTER (WHERE c.per_key), '{{}}') AS bounded,
           coalesce(array_agg(k.kind) FILTER (WHERE NOT coalesce(c.per_key, false)), '{{}}')
               AS unbounded
    FROM unnest($2::text[]) AS k(kind)
    LEFT JOIN ctl AS c ON c.scope = 'kind' AND c.name = k.kind
    WHERE NOT coalesce(c.paused, false)
), running AS MATERIALIZED (
    -- A hint of the running jobs of each key under a per-key limit, as two maps (per queue
    -- and key, per kind and key), for choosing which keys to lock: the decision counts them
    -- again, under the locks.
    SELECT coalesce(jsonb_object_agg(x.k, x.n) FILTER (WHERE x.by = 'queue'), '{{}}') AS by_queue,
           coalesce(jsonb_object_agg(x.k, x.n) FILTER (WHERE x.by = 'kind'), '{{}}') AS by_kind
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
    CROSS JOIN LATERAL ({_STEP_KEY}) AS k
    CROSS JOIN LATERAL ({_KEY_SHARE.format(queue="keys.queue")}) AS s
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
               AND {_RATE_TOKENS.format(at="clock_timestamp()")} < 1)
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
"""

# The second locks what the decision depends on, so that no other claim can change it until
# this one commits. A limit with a bound over all its jobs (max_concurrency, a rate) or a fair
# queue: its row, in one order (no deadlock between claimers); claims that share it take turns
# here. A per-key bound (max_per_key, a per-key rate) depends only on the key's own jobs: the
# claim locks the keys it will read instead (a transaction-scoped advisory lock per key, see
# KEY_LOCK_CLASS), and claims of different keys decide at the same time. The third starts after
# the locks are held, so its snapshot sees every claim committed by the previous holder: the
# running jobs it counts, the tokens it reads, are current, and no other claim under these
# bounds can commit until this one does. Jobs that end meanwhile only free slots: a count that
# still sees them errs on the safe side. The key walk came before the locks, so they are held
# only for the decision: a probe per key visited, not per key waiting. Keys are locked after
# the limits' rows, not as the walk visits them: a claim waiting for a row would hold its keys
# all the while, and the claims of other kinds that need no row would find them held.
_LOCK_LIMITS = """
SELECT scope, name FROM jobq_flow_controls
WHERE limited AND (max_concurrency IS NOT NULL OR rate IS NOT NULL OR fair)
  AND ((scope = 'kind' AND name = ANY($2::text[]))
       OR (scope = 'queue' AND name = ANY($3::text[])))
ORDER BY scope, name
FOR UPDATE
"""


# A (kind or queue, key) pair's entry in the claim's maps of running jobs. Jobs without a key
# count under the "no key" key, the name and chr(30): a name holds no control character, so
# this is no other pair's entry.
_MAP_KEY = "({name} || coalesce(chr(31) || {key}, chr(30)))"
_QUEUE_KEY = _MAP_KEY.format(name="w.queue", key="w.key")
_NO_KEY_OF = _MAP_KEY.format(name="{name}", key="NULL")
_KIND_KEY = _MAP_KEY.format(name="k.kind", key="w.key")

# The key of the bucket jobs without a key share under a per-key rate: no key jobq accepts
# holds a control character.
_NO_BUCKET = "chr(30)"

# What the "no key" key of {scope} {name} (a row {row} with max_per_key and key_burst) can still
# start: its per-key limit less its running jobs, its bucket's size and tokens (NULL: no bound).
_NO_KEY_ROOM = f"""
               {{row}}.max_per_key - coalesce(
                   (kr.by_{{scope}} ->> {_NO_KEY_OF.format(name="{name}")})::int, 0),
               {{row}}.key_burst,
               (SELECT floor(t.tokens)::int FROM key_tokens AS t
                WHERE t.scope = '{{scope}}' AND t.name = {{name}} AND t.key = {_NO_BUCKET})"""

# In a fair queue, `turn` is a job's place within its key and `pos` its key's place in the walk
# (round robin from the cursor); elsewhere both are constant and claim order applies.
_ORDER = "turn, priority, pos, run_at, id"


def _ranks(*, kinds: bool, queues: bool, kind_keys: bool, queue_keys: bool) -> str:
    """SQL: the candidates with their ranks in claim order: overall, per kind and per queue
    (for kinds' and queues' room), per kind and key and per queue and key (starts of the key in
    this claim, for per-key limits and buckets); a rank not asked for is 1."""

    def rank(wanted: bool, partition: str, name: str) -> str:
        over = f"PARTITION BY {partition} ORDER BY {_ORDER}" if partition else f"ORDER BY {_ORDER}"
        return f"row_number() OVER ({over}) AS {name}" if wanted else f"1::bigint AS {name}"

    ranks = ",\n           ".join([
        rank(True, "", "n_all"),
        rank(kinds, "c.kind", "n_kind"),
        rank(queues, "c.queue", "n_queue"),
        rank(kind_keys, "c.kind, c.key", "s_kind_key"),
        rank(queue_keys, "c.queue, c.key", "s_queue_key"),
    ])  # fmt: skip
    return f"SELECT c.*,\n           {ranks}\n    FROM candidates AS c"


_CLAIMED_FIELDS = ", ".join(f"claimed.{f}" for f in _JOB_FIELDS)

# The function's arguments: $1 worker, $2 kinds, $3 queues, $4 n, $5 lease seconds, $6/$7/$8
# max attempts (see _CLAIM). Its variables, from the walk and the locks: w_queue/w_key/w_pos the
# keys walked (queue, key, place in the walk), w_held per key walked whether the claim holds
# it, cut whether the walk left keys it might have taken to the next claims, no_key whether the
# claim may take jobs without a key in keyed queues (it holds their lock, or none is needed);
# l_scope/l_name the limits' rows it holds locked, lock_keys whether per-key bounds applied
# when the walk ran (then it locked keys).
_CLAIM_LIMITED = f"""
WITH ctl AS (
    -- The bucket refilled up to `at`, at most full. `at` is read now, after the lock was
    -- granted, not at the transaction's start (now()): a claim that began before the previous
    -- holder of the lock but got it after must not move the bucket's time back and be
    -- credited the same interval twice.
    SELECT c.scope, c.name, c.paused_at IS NOT NULL AS paused, c.limited, c.max_concurrency,
           c.max_per_key, c.fair, c.fair_weights, c.rate_per_key, c.burst_per_key, t.at,
           CASE WHEN c.rate IS NOT NULL THEN {_RATE_TOKENS.format(at="t.at")} END AS tokens
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
                        SELECT {_MAP_KEY.format(name="kind", key="key")} AS k, sum(n)::int AS n
                        FROM running GROUP BY 1) AS x), '{{}}') AS by_kind,
           coalesce((SELECT jsonb_object_agg(x.k, x.n) FROM (
                        SELECT {_MAP_KEY.format(name="queue", key="key")} AS k, sum(n)::int AS n
                        FROM running GROUP BY 1) AS x), '{{}}') AS by_queue
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
               q.max_per_key - coalesce((kr.by_queue ->> {_QUEUE_KEY})::int, 0),
               q.key_burst,
               CASE WHEN kb.all_bounded THEN (
                   SELECT max(least(r.max_per_key - coalesce(
                                        (kr.by_kind ->> {_KIND_KEY})::int, 0),
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
    SELECT {_NO_BUCKET} WHERE no_key::bool AND lock_keys::bool
), key_tokens AS MATERIALIZED (
    -- Under a per-key rate, each such key: its bucket refilled up to `at` (no row: full).
    SELECT ctl.scope, ctl.name, w.key, ctl.at, ctl.rate_per_key, ctl.burst_per_key,
           {_KEY_TOKENS.format(tokens="b.tokens", refilled_at="b.refilled_at")} AS tokens
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
        WHERE j.{_WAITING} AND j.queue = kc.queue
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
        WHERE h.{_WAITING} AND h.queue = q.queue AND h.run_at <= now()
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
               q.cap,{_NO_KEY_ROOM.format(scope="queue", row="q", name="q.queue")})) AS cap
    FROM open_queues AS q
    CROSS JOIN key_running AS kr
    WHERE q.keyed AND no_key::bool
), no_key_kind_caps AS MATERIALIZED (
    SELECT r.name AS kind,
           greatest(0, least({_NO_KEY_ROOM.format(scope="kind", row="r", name="r.name")})) AS cap
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
        WHERE j.{_WAITING} AND j.queue = q.queue AND j.run_at <= now()
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
           coalesce((kr.by_kind ->> {_MAP_KEY.format(name="c.kind", key="c.key")})::int, 0)
               AS kind_key_running,
           coalesce((kr.by_queue ->> {_MAP_KEY.format(name="c.queue", key="c.key")})::int, 0)
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
    {_ranks(kinds=True, queues=True, kind_keys=True, queue_keys=True)}
    WHERE (SELECT free OR (kind_keys AND queue_keys) FROM shape)
    UNION ALL
    {_ranks(kinds=False, queues=False, kind_keys=True, queue_keys=False)}
    WHERE (SELECT NOT free AND NOT queue_keys FROM shape)
    UNION ALL
    {_ranks(kinds=False, queues=False, kind_keys=False, queue_keys=True)}
    WHERE (SELECT NOT free AND queue_keys AND NOT kind_keys FROM shape)
), picked AS (
    SELECT r.id, r.turn, r.pos, r.walked
    FROM ranked AS r
    LEFT JOIN room AS rk ON rk.scope = 'kind' AND rk.name = r.kind
    LEFT JOIN room AS rq ON rq.scope = 'queue' AND rq.name = r.queue
    LEFT JOIN key_tokens AS tk ON tk.scope = 'kind' AND tk.name = r.kind
        AND tk.key = coalesce(r.key, {_NO_BUCKET})
    LEFT JOIN key_tokens AS tq ON tq.scope = 'queue' AND tq.name = r.queue
        AND tq.key = coalesce(r.key, {_NO_BUCKET})
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
    WHERE j.{_WAITING}
    ORDER BY j.id
    FOR UPDATE OF j SKIP LOCKED
), claimed AS (
    UPDATE jobs AS j
    SET {_LEASE}
    FROM locked
    WHERE j.id = locked.id
    RETURNING {_CLAIM_RETURNING}, locked.turn AS _turn, locked.pos AS _pos,
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
    JOIN claimed AS x ON coalesce(x.concurrency_key, {_NO_BUCKET}) = t.key
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
          AND {_KEY_TOKENS.format(tokens="o.tokens", refilled_at="o.refilled_at")}
              >= ctl.burst_per_key
          AND NOT EXISTS (SELECT 1 FROM claimed AS x
                          WHERE coalesce(x.concurrency_key, {_NO_BUCKET}) = o.key)
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
      AND pg_try_advisory_xact_lock({CURSOR_LOCK_CLASS}, hashtext(t.queue))
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
                WHERE j.{_WAITING} AND j.queue = ANY($3::text[]) AND j.kind = ANY($2::text[])
                  AND j.run_at <= now()
                  AND (j.kind IN (SELECT name FROM room WHERE scope = 'kind' AND free <= 0)
                       OR j.queue IN (SELECT name FROM room WHERE scope = 'queue' AND free <= 0))
            )) AS held
)
SELECT {_CLAIMED_FIELDS},
       claimed._turn::bigint, claimed._pos::int, claimed._walked::int, held.held AS _held,
       EXISTS (SELECT 1 FROM ctl WHERE NOT paused
                   AND (max_per_key IS NOT NULL OR rate_per_key IS NOT NULL
                        OR (scope = 'queue' AND fair))) AS _keyed,
       ((SELECT count(*) FROM spent) + (SELECT count(*) FROM moved)
       + (SELECT count(*) FROM cursor_added)
       + (SELECT count(*) FROM key_spent) + (SELECT count(*) FROM key_pruned))::bigint AS _written
FROM held LEFT JOIN claimed ON true
"""

# The job columns jobq_claim_limited returns, as the jobs table types them.
_JOB_TYPES = {
    "id": "uuid", "kind": "text", "queue": "text", "payload": "jsonb", "status": "text",
    "priority": "smallint", "attempts": "integer", "max_attempts": "integer",
    "run_at": "timestamptz", "idempotency_key": "text", "cancel_requested": "boolean",
    "lease_owner": "text", "lease_token": "uuid", "lease_expires_at": "timestamptz",
    "retry_delay_seconds": "float8", "last_error": "text", "errors": "jsonb", "result": "jsonb",
    "created_at": "timestamptz", "updated_at": "timestamptz", "started_at": "timestamptz",
    "finished_at": "timestamptz", "concurrency_key": "text", "progress": "jsonb",
    "trace_context": "jsonb",
}  # fmt: skip


def claim_limited_function() -> str:
    """The definition of jobq_claim_limited: the walk, the lock and the decision above as one
    function, so that the limited claim is one round trip. The newest migration defining it
    must state exactly this (tests/test_migrations.py): a change to those statements needs a
    migration ending with `python -c 'from jobq.queue import flow;
    print(flow.claim_limited_function(), end="")'`. Each statement of a volatile function
    takes its own snapshot under READ COMMITTED, so the decision still starts after the lock
    is granted. Arguments: $1 worker, $2 kinds, $3 queues, $4 n, $5 lease seconds, $6/$7/$8
    max attempts, $9 the walk's bound."""
    walk, lock, claim = _WALK_KEYS.strip(), _LOCK_LIMITS.strip(), _CLAIM_LIMITED.strip()
    columns = ",\n    ".join(f"{f} {_JOB_TYPES[f]}" for f in _JOB_FIELDS)
    nulls = ", ".join(f"NULL::{_JOB_TYPES[f]}" for f in _JOB_FIELDS)
    # Keys in walk order, the queues' keys taking turns: the lock loop below stops once it
    # holds enough, and must not spend it all on the first queue's.
    walked = "array_agg(x.{} ORDER BY x.pos, x.queue) FILTER (WHERE x.key IS NOT NULL)"
    return f"""CREATE OR REPLACE FUNCTION
    jobq_claim_limited(text, text[], text[], int, float8, text[], int[], int, int)
RETURNS TABLE (
    {columns},
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
    w_held boolean[] := '{{}}';
    visited int := 0;
    locked int := 0;
    hinted jsonb := '{{}}';
    queue_hinted int;
BEGIN
    SELECT coalesce({walked.format("queue")}, '{{}}'),
           coalesce({walked.format("key")}, '{{}}'),
           coalesce({walked.format("pos")}, '{{}}'),
           coalesce({walked.format("room")}, '{{}}'),
           coalesce({walked.format("fair")}, '{{}}'),
           coalesce(bool_or(x.pos >= $9), false), bool_or(x.shut), bool_or(x.full),
           bool_or(x.lock_keys)
    INTO w_queue, w_key, w_pos, w_room, w_fair, cut, is_shut, is_full, lock_keys
    FROM (
{walk}
    ) AS x;
    IF is_shut THEN
        -- Every kind or every queue is paused or has no room: nothing to lock for.
        RETURN QUERY SELECT {nulls},
            NULL::bigint, NULL::int, NULL::int, is_full, $9 > 0, 0::bigint;
        RETURN;
    END IF;
    SELECT coalesce(array_agg(l.scope), '{{}}'), coalesce(array_agg(l.name), '{{}}')
    INTO l_scope, l_name
    FROM (
{lock}
    ) AS l;
    IF lock_keys THEN
        -- The keys to read, in walk order (the queues' keys taking turns), until their hinted
        -- room covers what is asked for, in each queue (in a fair queue, whose keys take
        -- turns, as many as walked): those another claim holds are passed over (it decides
        -- for them), and so are those the hint says are full. A key held elsewhere or full
        -- kept jobs back: try again soon.
        FOR i IN 1 .. cardinality(w_key) LOOP
            EXIT WHEN locked >= {KEY_LOCKS};
            visited := i;
            queue_hinted := coalesce((hinted ->> w_queue[i])::int, 0);
            IF queue_hinted >= $4 AND NOT w_fair[i] THEN
                w_held := w_held || false;
            ELSIF coalesce(w_room[i], $4) > 0
               AND pg_try_advisory_xact_lock({KEY_LOCK_CLASS}, hashtext(w_key[i])) THEN
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
        no_key := pg_try_advisory_xact_lock({KEY_LOCK_CLASS}, hashtext(chr(30)));
        cut := cut OR NOT no_key;
    ELSE
        w_held := array_fill(true, ARRAY[cardinality(w_key)]);
    END IF;
    RETURN QUERY
{claim};
END
$fn$;
"""


_CLAIM_LIMITED_CALL = "SELECT * FROM jobq_claim_limited($1, $2, $3, $4, $5, $6, $7, $8, $9)"

_USAGE = f"""
WITH ctl AS (
    SELECT c.*, CASE WHEN c.rate IS NOT NULL THEN {_RATE_TOKENS.format(at="now()")} END
               AS tokens_now
    FROM jobq_flow_controls AS c WHERE c.limited
), running AS (
    SELECT j.kind, j.queue, j.concurrency_key AS key, count(*)::int AS n
    FROM jobs AS j
    WHERE j.status = 'running'
      AND (j.kind IN (SELECT name FROM ctl WHERE scope = 'kind')
           OR j.queue IN (SELECT name FROM ctl WHERE scope = 'queue'))
    GROUP BY 1, 2, 3
)
SELECT ctl.scope, ctl.name, ctl.paused_at, ctl.max_concurrency, ctl.max_per_key, ctl.rate,
       ctl.burst, ctl.fair, ctl.rate_per_key, ctl.burst_per_key, ctl.paused_by, ctl.tokens_now,
       coalesce((SELECT sum(r.n) FROM running AS r
                 WHERE CASE ctl.scope WHEN 'kind' THEN r.kind ELSE r.queue END = ctl.name),
                0)::int AS running,
       coalesce((SELECT array_agg(k.key ORDER BY k.n DESC, k.key) FROM (
                    SELECT r.key, sum(r.n) AS n FROM running AS r
                    WHERE CASE ctl.scope WHEN 'kind' THEN r.kind ELSE r.queue END = ctl.name
                      AND r.key IS NOT NULL
                    GROUP BY r.key ORDER BY sum(r.n) DESC, r.key LIMIT 20) AS k),
                '{{}}') AS keys,
       coalesce((SELECT array_agg(k.n::int ORDER BY k.n DESC, k.key) FROM (
                    SELECT r.key, sum(r.n) AS n FROM running AS r
                    WHERE CASE ctl.scope WHEN 'kind' THEN r.kind ELSE r.queue END = ctl.name
                      AND r.key IS NOT NULL
                    GROUP BY r.key ORDER BY sum(r.n) DESC, r.key LIMIT 20) AS k),
                '{{}}') AS key_counts
FROM ctl
ORDER BY ctl.scope, ctl.name
"""


# Buckets that have refilled since (a full bucket is no row), and those of limits no longer
# declared. Claims remove refilled buckets only of the keys they hold; this removes the rest
# (keys with no job waiting are walked by no claim). A bucket a claim is writing is skipped.
_PRUNE_KEY_BUCKETS = f"""
DELETE FROM jobq_flow_key_buckets AS b
WHERE (b.scope, b.name, b.key) IN (
    SELECT o.scope, o.name, o.key
    FROM jobq_flow_key_buckets AS o
    LEFT JOIN jobq_flow_controls AS c ON c.scope = o.scope AND c.name = o.name
    WHERE c.rate_per_key IS NULL
       OR {
    _refilled(
        burst="c.burst_per_key",
        tokens="o.tokens",
        rate="c.rate_per_key",
        refilled_at="o.refilled_at",
        at="clock_timestamp()",
    )
} >= c.burst_per_key
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED)
"""


class TooManyPaused(Exception):
    """A new pause while `limit` queues and kinds are paused already (JOBQ_MAX_PAUSED)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"{limit} queues and kinds are paused already, the most JOBQ_MAX_PAUSED allows;"
            " resume some first"
        )
        self.limit = limit


class Flow(Views):
    # -- operators: pause and resume -------------------------------------------------------

    async def pause(
        self, scope: str, name: str, *, by: str | None = None, max_paused: int | None = None
    ) -> FlowState:
        """Stop claims of a queue's (or a kind's) jobs; running ones finish, enqueue goes on.

        A queue or kind with no jobs yet can be paused: it is a name, not a row of `jobs`.
        Idempotent: pausing again keeps the first pause's time and `by` (who paused it:
        printable, 1 to 200 characters). With `max_paused`, a name not
        paused yet is refused (TooManyPaused) while that many are paused."""
        check_scope(scope)
        _check_name(scope, name)
        check_paused_by(by)
        row = await self.pool.fetchrow(_PAUSE, scope, name, by, max_paused)
        if row is None:
            assert max_paused is not None
            raise TooManyPaused(max_paused)
        return FlowState.from_record(row)

    async def resume(self, scope: str, name: str) -> FlowState:
        """Let claims take the queue's (or kind's) jobs again. Idempotent."""
        check_scope(scope)
        _check_name(scope, name)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_RESUME, scope, name)
            await conn.execute(_DROP_UNUSED, scope, name)
        if row is None or not row["limited"]:
            return FlowState.unset(scope, name)
        return FlowState.from_record(row)

    async def flow_states(self) -> list[FlowState]:
        """Every paused or limited queue and kind."""
        return [FlowState.from_record(r) for r in await self.pool.fetch(_STATES)]

    async def queue_infos(self) -> list[QueueInfo]:
        """Every queue that has jobs or a pause or limit: its state and counts by status
        (from the count rollups: constant time, whatever the history holds)."""
        states, counts = await asyncio.gather(self.flow_states(), self.counts())
        by_queue: dict[str, dict[str, int]] = {}
        for name, status, n in counts:
            by_queue.setdefault(name, {})[status] = n
        flow = {s.name: s for s in states if s.scope == "queue"}
        return [
            QueueInfo(
                name, flow.get(name) or FlowState.unset("queue", name), by_queue.get(name, {})
            )
            for name in sorted(by_queue.keys() | flow.keys())
        ]

    # -- workers: declaring limits, and claiming under them --------------------------------

    async def declare_limits(
        self,
        worker: str,
        kinds: Mapping[str, Limits],
        queues: Mapping[str, Limits],
    ) -> None:
        """Store the limits a worker's registry declares for its kinds and queues, replacing
        what was stored for them (the last worker to start wins); a kind or queue it
        declares nothing for loses its limits. Pauses are kept."""
        rows = [("kind", k, lim) for k, lim in kinds.items()]
        rows += [("queue", q, lim) for q, lim in queues.items()]
        if not rows:
            return
        rows.sort(key=lambda r: (r[0], r[1]))  # lock order
        args = (
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2].max_concurrency for r in rows],
            [r[2].max_per_key for r in rows],
            [r[2].rate for r in rows],
            [r[2].burst for r in rows],
            [r[2].fair for r in rows],
            worker,
            [None if r[2].key_path is None else orjson.dumps(r[2].key_path).decode() for r in rows],
            [r[2].rate_per_key for r in rows],
            [r[2].burst_per_key for r in rows],
            [
                None
                if r[2].fair_weights is None
                else orjson.dumps(dict(r[2].fair_weights)).decode()
                for r in rows
            ],
        )
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.fetchval(_DECLARE, *args)
            await conn.execute(_DROP_EMPTY, list(SCOPES), [r[1] for r in rows])

    async def limits_apply(self, kinds: Sequence[str], queues: Sequence[str]) -> bool:
        """Whether any limit stored covers one of these kinds or queues: then a worker must
        claim them with `claim_limited` (the plain claim leaves them out)."""
        return bool(await self.pool.fetchval(_APPLIES, list(kinds), list(queues)))

    async def limits_cover(self, kinds: Sequence[str], queues: Sequence[str]) -> tuple[bool, bool]:
        """(`limits_apply`, and whether limits cover every one of these kinds or every one of
        these queues: then the plain claim would find nothing of theirs to take)."""
        row = await self.pool.fetchrow(_COVER, list(kinds), list(queues))
        assert row is not None  # one row, always
        return bool(row["applies"]), bool(row["applies"] and row["covered"])

    async def claim_limited(
        self,
        worker: str,
        kinds: Sequence[str],
        queues: Sequence[str],
        n: int,
        *,
        lease_seconds: float,
        max_attempts: Mapping[str, int] | None = None,
    ) -> list[Job]:
        """`claim` under every pause and limit stored: concurrency per kind, queue and key,
        rate limits, fair share. Jobs come back in claim order (turn, priority, run_at, id)."""
        claim = await self.claim_limited_held(
            worker, kinds, queues, n, lease_seconds=lease_seconds, max_attempts=max_attempts
        )
        return claim.jobs

    async def claim_limited_held(
        self,
        worker: str,
        kinds: Sequence[str],
        queues: Sequence[str],
        n: int,
        *,
        lease_seconds: float,
        max_attempts: Mapping[str, int] | None = None,
        walk_keys: bool = True,
    ) -> LimitedClaim:
        """`claim_limited`, and whether a bound (a limit full, a bucket empty, the key walk's
        bound) kept back jobs it could otherwise have taken. `walk_keys=False` (the last claim
        said no queue is keyed) saves the key walk; should a queue be keyed by
        now, the claim takes none of its keyed jobs and says it held jobs back."""
        if n <= 0 or not kinds or not queues:
            return LimitedClaim([], held_back=False)
        per_kind = max_attempts or {}
        walk_bound = KEY_WALK
        # One round trip: jobq_claim_limited (claim_limited_function) runs the walk, the locks
        # and the decision, each statement with its own snapshot, in this one's transaction.
        rows = await self.pool.fetch(
            _CLAIM_LIMITED_CALL,
            worker,
            list(kinds),
            list(queues),
            n,
            float(lease_seconds),
            list(per_kind),
            list(per_kind.values()),
            self.default_max_attempts,
            walk_bound if walk_keys else 0,
        )
        got = [r for r in rows if r["id"] is not None]
        got.sort(key=lambda r: (r["_turn"], r["priority"], r["_pos"], r["run_at"], r["id"]))
        keyed = bool(rows[0]["_keyed"])
        held = bool(rows[0]["_held"]) or (keyed and not walk_keys)
        return LimitedClaim([Job.from_record(r) for r in got], held_back=held, keyed=keyed)

    async def prune_key_buckets(self, limit: int = 1_000) -> int:
        """Delete up to `limit` per-key buckets that have refilled (or whose limit is gone);
        how many."""
        status = await self.pool.execute(_PRUNE_KEY_BUCKETS, limit)
        return int(status.split()[-1])

    async def limit_usage(self) -> list[LimitUsage]:
        """Every limited queue and kind: running jobs against the limits, per key too."""
        rows = await self.pool.fetch(_USAGE)
        return [
            LimitUsage(
                FlowState.from_record(r),
                r["running"],
                r["tokens_now"],
                list(zip(r["keys"], r["key_counts"], strict=True)),
            )
            for r in rows
        ]
