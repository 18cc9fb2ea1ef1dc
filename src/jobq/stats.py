"""The operator's overview, as `GET /stats`, the dashboard and `jobq status` show it."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Any

from jobq.queue import STATUSES, Queue

WINDOW_MINUTES = 15
FAILING_KINDS_LIMIT = 5


async def collect(queue: Queue, *, minutes: int = WINDOW_MINUTES) -> dict[str, Any]:
    """Everything the overview shows, as JSON-ready data (`StatsOut`). One query per part."""
    flow_parts = asyncio.gather(queue.flow_states(), queue.limit_usage())
    (counts, lags, per_minute, failing, unhandled, workers), schedules = await asyncio.gather(
        asyncio.gather(
            queue.counts(),
            queue.oldest_due(),
            queue.finished_per_minute(minutes),
            queue.failing_kinds(minutes, FAILING_KINDS_LIMIT),
            queue.unhandled(),
            queue.workers(),
        ),
        queue.schedules(),
    )
    flow, usage = await flow_parts
    by_queue: dict[str, dict[str, int]] = {}
    for name, status, n in counts:
        by_queue.setdefault(name, dict.fromkeys(STATUSES, 0))[status] = n
    lag_by_queue = {lag.queue: lag for lag in lags}
    for name in lag_by_queue:
        by_queue.setdefault(name, dict.fromkeys(STATUSES, 0))
    paused = {s.name: s.paused_by for s in flow if s.scope == "queue" and s.paused}
    # Every queue with jobs, a pause or a limit: the queues GET /queues lists.
    for name in {s.name for s in flow if s.scope == "queue"}:
        by_queue.setdefault(name, dict.fromkeys(STATUSES, 0))
    queues = []
    for name in sorted(by_queue):
        lag = lag_by_queue.get(name)
        queues.append(
            {
                "queue": name,
                "counts": by_queue[name],
                "total": sum(by_queue[name].values()),
                "oldest_due_at": lag.oldest_run_at if lag else None,
                "oldest_due_age_seconds": round(lag.age_seconds, 3) if lag else None,
                "paused": name in paused,
                "paused_by": paused.get(name),
            }
        )
    return {
        "generated_at": datetime.now(UTC),
        "paused_kinds": sorted(s.name for s in flow if s.scope == "kind" and s.paused),
        "limits": [
            {
                "scope": u.state.scope,
                "name": u.state.name,
                "running": u.running,
                "max_concurrency": u.state.max_concurrency,
                "max_per_key": u.state.max_per_key,
                "rate_per_second": u.state.rate,
                "burst": u.state.burst,
                "tokens": None if u.tokens is None else round(u.tokens, 3),
                "fair": u.state.fair,
                "keys": [{"key": k, "running": n} for k, n in u.keys],
            }
            for u in usage
        ],
        "window_minutes": minutes,
        "queues": queues,
        "finished_per_minute": [
            {
                "minute": m.minute,
                "succeeded": m.succeeded,
                "failed_permanent": m.failed,
                "cancelled": m.cancelled,
            }
            for m in per_minute
        ],
        "failing_kinds": [
            {
                "kind": f.kind,
                "failed_permanent": f.failed,
                "retrying": f.retrying,
                "last_error": f.last_error,
                "last_job_id": str(f.last_job_id),
                "last_failed_at": f.last_failed_at,
            }
            for f in failing
        ],
        "unhandled": [
            {
                "queue": u.queue,
                "kind": u.kind,
                "count": u.count,
                "oldest_created_at": u.oldest_created_at,
            }
            for u in unhandled
        ],
        "workers": [
            {
                "worker_id": w.worker_id,
                "kinds": w.kinds,
                "queues": w.queues,
                "concurrency": w.concurrency,
                "started_at": w.started_at,
                "last_seen_at": w.last_seen_at,
            }
            for w in workers
        ],
        "schedules": [
            {
                "name": p.name,
                "kind": p.kind,
                "queue": p.queue,
                "spec": p.spec,
                "next_run_at": p.next_run_at,
                "last_run_at": p.last_run_at,
                "last_job_id": str(p.last_job_id) if p.last_job_id else None,
                "declared_at": p.declared_at,
            }
            for p in schedules
        ],
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _paused_note(q: dict[str, Any]) -> str:
    if not q.get("paused"):
        return ""
    # paused_by is printable (checked at the pause): nothing a terminal would act on.
    return f" (paused by {q['paused_by']})" if q.get("paused_by") else " (paused)"


def render_text(body: dict[str, Any]) -> str:
    """`collect()`'s overview as a plain-text report for a terminal."""
    header = ["queue", *STATUSES, "total", "oldest due"]
    rows = [
        [
            q["queue"] + _paused_note(q),
            *(str(q["counts"][s]) for s in STATUSES),
            str(q["total"]),
            _age(q["oldest_due_age_seconds"]),
        ]
        for q in body["queues"]
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows] if rows else ["(no jobs)"]
    minutes = body["finished_per_minute"]
    finished = sum(m["succeeded"] + m["failed_permanent"] + m["cancelled"] for m in minutes)
    failed = sum(m["failed_permanent"] for m in minutes)
    ended = sum(m["succeeded"] + m["failed_permanent"] for m in minutes)
    last_full = minutes[-2] if len(minutes) > 1 else None
    per_second = (
        (last_full["succeeded"] + last_full["failed_permanent"] + last_full["cancelled"]) / 60
        if last_full
        else 0.0
    )
    rate = 100 * failed / ended if ended else 0.0
    out += [
        "",
        f"throughput: {per_second:.2f} jobs/s in the last full minute; {finished} finished in "
        f"the last {body['window_minutes']} min, {rate:.1f}% failed",
    ]
    for f in body["failing_kinds"]:
        error = (f["last_error"] or "").splitlines()[0] if f["last_error"] else "-"
        out.append(
            f"failing: {f['kind']} ({f['failed_permanent']} failed, {f['retrying']} retrying): "
            f"{error[:120]}"
        )
    for u in body["unhandled"]:
        out.append(f"no worker handles: {u['kind']} in queue {u['queue']} ({u['count']} waiting)")
    for kind in body.get("paused_kinds", []):
        out.append(f"paused kind: {kind}")
    for lim in body.get("limits", []):
        bounds = [f"{lim['running']} running"]
        if lim["max_concurrency"]:
            bounds[0] += f" of {lim['max_concurrency']}"
        if lim["max_per_key"]:
            top = ", ".join(f"{k['key']}={k['running']}" for k in lim["keys"][:5])
            bounds.append(f"at most {lim['max_per_key']} per key" + (f" ({top})" if top else ""))
        if lim["rate_per_second"]:
            bounds.append(f"{lim['rate_per_second']:g}/s")
        if lim["fair"]:
            bounds.append("fair share")
        out.append(f"limit: {lim['scope']} {lim['name']}: {'; '.join(bounds)}")
    for p in body.get("schedules", []):
        next_run = p["next_run_at"]
        when = next_run.isoformat() if isinstance(next_run, datetime) else str(next_run or "-")
        out.append(f"schedule: {p['name']} ({p['kind']}, {p['spec']}): next run {when}")
    workers = body["workers"]
    out.append(
        f"workers: {len(workers)} live"
        + (f" ({', '.join(w['worker_id'] for w in workers)})" if workers else "")
    )
    return _TERMINAL_CONTROLS.sub(_escaped, "\n".join(out))


# Errors are text a job's payload can choose (a handler echoing its input): printed as they
# are, escape sequences would clear the operator's screen, retitle it or write the clipboard.
# Bidirectional overrides would reorder what is shown.
_TERMINAL_CONTROLS = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def _escaped(match: re.Match[str]) -> str:
    return f"\\u{ord(match[0]):04x}"
