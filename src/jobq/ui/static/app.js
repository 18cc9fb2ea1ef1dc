// jobq dashboard: reads the JSON API (GET /stats, /jobs, /jobs/{id}) and posts cancel/retry
// and queue pause/resume.
// Data only ever reaches the page as text nodes, never as markup.
"use strict";

(() => {
  const TOKEN_KEY = "jobq-token";
  const TERMINAL = new Set(["succeeded", "failed_permanent", "cancelled"]);
  const $ = (id) => document.getElementById(id);

  class AuthNeeded extends Error {}

  // -- DOM helpers -------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node.setAttribute(k, v);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setText(node, text) {
    if (node && node.textContent !== text) node.textContent = text;
  }

  function badge(status) {
    return el("span", { class: `badge s-${status}`, "data-status-badge": status }, status.replace("_", " "));
  }

  function jobsLink(params, text) {
    const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v));
    return el("a", { href: `/ui/jobs?${q}` }, text);
  }

  // -- time --------------------------------------------------------------------------------

  function fmtDuration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  const pad = (n) => String(n).padStart(2, "0");

  function fmtClock(d) {
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  // Local time with the date, always: a time alone is ambiguous once a job is a day old.
  function fmtTime(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${fmtClock(d)}`;
  }

  function fmtAttempts(j) {
    // No max_attempts given: the handler's value applies (resolved when the job is claimed).
    return `${j.attempts} / ${j.max_attempts ?? "handler's"}`;
  }

  function fmtAgo(iso) {
    if (!iso) return "";
    const delta = (Date.now() - new Date(iso).getTime()) / 1000;
    return delta >= 0 ? `${fmtDuration(delta)} ago` : `in ${fmtDuration(-delta)}`;
  }

  // -- API and auth ------------------------------------------------------------------------

  async function api(path, options = {}) {
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    const res = await fetch(path, { ...options, headers, cache: "no-store" });
    if (res.status === 401) {
      showLogin(token ? "That token was refused." : "");
      throw new AuthNeeded();
    }
    const type = res.headers.get("content-type") || "";
    const body = type.includes("json") ? await res.json() : null;
    if (!res.ok) {
      const err = new Error((body && body.detail) || `${res.status} ${res.statusText}`);
      err.status = res.status;
      err.problem = body;
      throw err;
    }
    return { status: res.status, body };
  }

  let resume = null;

  function showLogin(message) {
    $("login").hidden = false;
    setText($("login-error"), message);
    $("token").focus();
  }

  function setupLogin() {
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token").value = "";
      $("login").hidden = true;
      updateForget();
      if (resume) resume();
    });
    $("forget-token").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      updateForget();
      if (document.body.dataset.auth === "on") showLogin("");
    });
    updateForget();
  }

  function updateForget() {
    $("forget-token").hidden = !sessionStorage.getItem(TOKEN_KEY);
  }

  // -- polling -----------------------------------------------------------------------------

  function setLive(ok, text) {
    const live = $("live");
    live.classList.toggle("ok", ok);
    live.classList.toggle("bad", !ok);
    setText($("live-text"), text);
  }

  function banner(message) {
    const node = $("banner");
    node.hidden = !message;
    setText(node, message || "");
  }

  // Calls `load` every `interval` ms (one call at a time); stops while a token is needed.
  // `onError(message)` lets a page show what it could not load where the data would be.
  function poll(load, interval, onError) {
    let timer = null;
    let running = false;
    async function tick() {
      clearTimeout(timer);
      if (running) return;
      running = true;
      let again = true;
      try {
        if (!document.hidden) {
          await load();
          setLive(true, `updated ${fmtClock(new Date())}`);
          banner("");
        }
      } catch (err) {
        if (err instanceof AuthNeeded) {
          again = false;
          setLive(false, "token needed");
        } else {
          setLive(false, "not updating");
          const message = err.status === 503 ? "The database is unavailable; retrying…" : `Could not load: ${err.message}`;
          banner(message);
          if (onError) onError(message);
        }
      } finally {
        running = false;
      }
      if (again) timer = setTimeout(tick, interval);
    }
    resume = tick;
    document.addEventListener("visibilitychange", () => { if (!document.hidden) tick(); });
    tick();
    return tick;
  }

  // -- overview ----------------------------------------------------------------------------

  const STATUSES = ["queued", "running", "retrying", "succeeded", "failed_permanent", "cancelled"];

  function renderCounts(queues) {
    const body = $("counts-body");
    const rows = new Map([...body.querySelectorAll("tr[data-queue-row]")].map((r) => [r.dataset.queueRow, r]));
    const empty = body.querySelector("tr.empty");
    if (empty) empty.hidden = queues.length > 0;
    const wanted = new Set();
    for (const q of queues) {
      wanted.add(q.queue);
      let row = rows.get(q.queue);
      if (!row) {
        row = el("tr", { "data-queue-row": q.queue }, el("th", { scope: "row" }, jobsLink({ queue: q.queue }, q.queue)));
        for (const s of STATUSES) {
          row.append(el("td", { class: "num", "data-queue": q.queue, "data-status": s }, jobsLink({ queue: q.queue, status: s }, "0")));
        }
        row.append(el("td", { class: "num", "data-queue": q.queue, "data-status": "total" }, "0"));
        row.append(el("td", { class: "num", "data-queue": q.queue, "data-oldest": "" }, "—"));
        const toggle = el("button", { type: "button", class: "pause", "data-pause": q.queue }, "Pause");
        toggle.addEventListener("click", () => togglePause(toggle));
        row.append(el("td", { class: "state" }, toggle, el("span", { class: "by", "data-paused-by": "" })));
        const after = [...body.querySelectorAll("tr[data-queue-row]")].find((r) => r.dataset.queueRow > q.queue);
        body.insertBefore(row, after || null);
      }
      for (const s of STATUSES) {
        const cell = row.querySelector(`td[data-status="${s}"]`);
        const n = q.counts[s];
        setText(cell.firstChild, n.toLocaleString());
        cell.classList.toggle("zero", n === 0);
      }
      setText(row.querySelector('td[data-status="total"]'), q.total.toLocaleString());
      setText(row.querySelector("td[data-oldest]"), q.oldest_due_age_seconds === null ? "—" : fmtDuration(q.oldest_due_age_seconds));
      const toggle = row.querySelector("button[data-pause]");
      if (!toggle.dataset.busy) {
        toggle.dataset.paused = q.paused ? "true" : "false";
        setText(toggle, q.paused ? "Resume" : "Pause");
        row.classList.toggle("paused", q.paused);
      }
      // Who paused it, when the pause said (POST .../pause {"by": ...}).
      setText(row.querySelector("span[data-paused-by]"), q.paused && q.paused_by ? ` by ${q.paused_by}` : "");
    }
    for (const [name, row] of rows) if (!wanted.has(name)) row.remove();
  }

  // Pauses or resumes a queue (POST /queues/{name}/pause|resume); the next poll shows it.
  async function togglePause(button) {
    const name = button.dataset.pause;
    const action = button.dataset.paused === "true" ? "resume" : "pause";
    button.disabled = true;
    button.dataset.busy = "1";
    try {
      const { body } = await api(`/queues/${encodeURIComponent(name)}/${action}`, { method: "POST" });
      button.dataset.paused = body.paused ? "true" : "false";
      setText(button, body.paused ? "Resume" : "Pause");
      button.closest("tr").classList.toggle("paused", body.paused);
    } catch (err) {
      if (!(err instanceof AuthNeeded)) button.title = err.message;
    } finally {
      delete button.dataset.busy;
      button.disabled = false;
    }
  }

  function niceMax(n) {
    if (n <= 4) return 4;
    const pow = 10 ** Math.floor(Math.log10(n));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * pow >= n) return m * pow;
    return 10 * pow;
  }

  function renderChart(minutes) {
    const chart = $("chart");
    const W = 640, H = 220, L = 44, R = 44, T = 12, B = 26;
    const plotW = W - L - R, plotH = H - T - B;
    const totals = minutes.map((m) => m.succeeded + m.failed_permanent + m.cancelled);
    const max = niceMax(Math.max(0, ...totals));
    const y = (v) => T + plotH - (v / max) * plotH;
    const slot = plotW / Math.max(1, minutes.length);
    const nodes = [];
    for (const frac of [0, 0.5, 1]) {
      nodes.push(svg("line", { class: "grid-line", x1: L, x2: W - R, y1: y(max * frac), y2: y(max * frac) }));
      nodes.push(svg("text", { x: L - 6, y: y(max * frac) + 4, "text-anchor": "end" }, String(max * frac)));
      nodes.push(svg("text", { x: W - R + 6, y: y(max * frac) + 4 }, `${frac * 100}%`));
    }
    const ratePoints = [];
    minutes.forEach((m, i) => {
      const x = L + i * slot + slot * 0.15;
      const w = slot * 0.7;
      let base = 0;
      const group = svg("g", {});
      const when = new Date(m.minute).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      group.append(svg("title", {}, `${when}: ${m.succeeded} succeeded, ${m.failed_permanent} failed, ${m.cancelled} cancelled`));
      group.append(svg("rect", { x: L + i * slot, y: T, width: slot, height: plotH, fill: "transparent" }));
      for (const key of ["succeeded", "failed_permanent", "cancelled"]) {
        const v = m[key];
        if (v > 0) {
          group.append(svg("rect", { class: `b-${key}`, x, width: w, y: y(base + v), height: y(base) - y(base + v) }));
        }
        base += v;
      }
      nodes.push(group);
      const ended = m.succeeded + m.failed_permanent;
      if (ended > 0) ratePoints.push([L + i * slot + slot / 2, T + plotH - (m.failed_permanent / ended) * plotH]);
      const fromEnd = minutes.length - 1 - i;
      if (fromEnd % 5 === 0) {
        nodes.push(svg("text", { x: L + i * slot + slot / 2, y: H - 8, "text-anchor": "middle" }, fromEnd === 0 ? "now" : `−${fromEnd} min`));
      }
    });
    if (ratePoints.length > 1) {
      nodes.push(svg("polyline", { class: "rate", points: ratePoints.map((p) => p.join(",")).join(" ") }));
    }
    for (const [px, py] of ratePoints) nodes.push(svg("circle", { class: "rate-dot", cx: px, cy: py, r: 2.5 }));
    chart.replaceChildren(...nodes);

    const finished = totals.reduce((a, b) => a + b, 0);
    const failed = minutes.reduce((a, m) => a + m.failed_permanent, 0);
    const ended = minutes.reduce((a, m) => a + m.succeeded + m.failed_permanent, 0);
    const lastFull = minutes.length > 1 ? totals[totals.length - 2] : 0;
    setText(
      $("throughput-summary"),
      `${finished.toLocaleString()} finished · ${(finished / (minutes.length * 60)).toFixed(2)} jobs/s average · ` +
        `${(lastFull / 60).toFixed(2)} jobs/s last full minute · ` +
        `failure rate ${ended ? ((100 * failed) / ended).toFixed(1) : "0.0"}%`,
    );
  }

  function renderList(id, items, emptyText, render) {
    renderItems(id, items, render, () => [el("li", { class: "muted", "data-state": "empty" }, emptyText)]);
  }

  function renderItems(id, items, render, empty = () => []) {
    const list = $(id);
    const key = JSON.stringify(items);
    if (list.dataset.key === key) return;
    list.dataset.key = key;
    list.replaceChildren(...(items.length ? items.map(render) : empty()));
  }

  function renderOverview(stats) {
    renderCounts(stats.queues);
    renderChart(stats.finished_per_minute);
    renderList("failing", stats.failing_kinds, "No failures.", (f) =>
      el(
        "li",
        { "data-kind": f.kind },
        el(
          "div",
          { class: "head" },
          el("strong", {}, jobsLink({ kind: f.kind, status: f.failed_permanent ? "failed_permanent" : "retrying" }, f.kind)),
          el("span", { class: "muted" }, `${f.failed_permanent} failed · ${f.retrying} retrying`),
        ),
        el("div", { class: "err", title: f.last_error || "" }, f.last_error ? f.last_error.split("\n")[0] : "(no message)"),
        el("div", { class: "muted" }, el("a", { href: `/ui/jobs/${f.last_job_id}` }, "latest job"), ` · ${fmtTime(f.last_failed_at)}`),
      ),
    );
    renderList("unhandled", stats.unhandled, "Every waiting job has a worker.", (u) =>
      el(
        "li",
        { "data-unhandled": `${u.queue}/${u.kind}` },
        el(
          "div",
          { class: "head" },
          el("span", {}, el("strong", {}, jobsLink({ kind: u.kind, queue: u.queue }, u.kind)), " in queue ", el("code", {}, u.queue)),
          el("span", {}, `${u.count.toLocaleString()} waiting`),
        ),
        el("div", { class: "muted" }, `oldest created ${fmtTime(u.oldest_created_at)}`),
      ),
    );
    const workers = stats.workers.map((w) => ({ ...w, last_seen_at: undefined }));
    renderList("workers", workers, "No worker is running.", (w) =>
      el(
        "li",
        {},
        el("div", { class: "head" }, el("code", {}, w.worker_id), el("span", { class: "muted" }, `concurrency ${w.concurrency}`)),
        el("div", { class: "muted" }, `kinds: ${w.kinds.join(", ")} · queues: ${w.queues.join(", ")} · since ${fmtTime(w.started_at)}`),
      ),
    );
    renderFlow(stats);
    const schedules = (stats.schedules || []).map((p) => ({ ...p, declared_at: undefined }));
    renderList("schedules", schedules, "No periodic schedule is declared by a running worker.", (p) =>
      el(
        "li",
        { "data-schedule": p.name },
        el(
          "div",
          { class: "head" },
          el("span", {}, el("strong", {}, jobsLink({ kind: p.kind, queue: p.queue }, p.name)), " ", el("code", {}, p.spec)),
          el("span", { class: "muted" }, p.next_run_at ? `next ${fmtTime(p.next_run_at)}` : "no next run"),
        ),
        el(
          "div",
          { class: "muted" },
          ...(p.last_job_id
            ? [el("a", { href: `/ui/jobs/${p.last_job_id}` }, "latest job"), ` · tick ${fmtTime(p.last_run_at)}`]
            : ["not run yet"]),
        ),
      ),
    );
  }

  // Paused kinds (with a Resume button) and every declared limit with what runs under it:
  // why jobs wait although workers are idle.
  function renderFlow(stats) {
    const paused = (stats.paused_kinds || []).map((kind) => ({ paused: kind }));
    const limits = (stats.limits || []).map((l) => ({ limit: l }));
    renderList("flow", [...paused, ...limits], "No kind is paused and no limit is declared.", (item) => {
      if (item.paused !== undefined) {
        const kind = item.paused;
        const button = el("button", { type: "button", class: "pause", "data-resume-kind": kind }, "Resume");
        button.addEventListener("click", () => resumeKind(button, kind));
        return el(
          "li",
          { "data-paused-kind": kind },
          el("div", { class: "head" }, el("span", {}, "kind ", el("strong", {}, jobsLink({ kind }, kind)), " is paused"), button),
        );
      }
      const l = item.limit;
      const bounds = [l.max_concurrency ? `${l.running} running of ${l.max_concurrency}` : `${l.running} running`];
      if (l.max_per_key) {
        const top = l.keys.slice(0, 5).map((k) => `${k.key}=${k.running}`).join(", ");
        bounds.push(`at most ${l.max_per_key} per key${top ? ` (${top})` : ""}`);
      }
      if (l.rate_per_second) bounds.push(`${l.rate_per_second}/s, bucket of ${l.burst}`);
      if (l.fair) bounds.push("fair share");
      const filter = l.scope === "kind" ? { kind: l.name } : { queue: l.name };
      return el(
        "li",
        { "data-limit": `${l.scope}/${l.name}` },
        el("div", { class: "head" }, el("span", {}, `${l.scope} `, el("strong", {}, jobsLink(filter, l.name))), el("span", { class: "muted" }, bounds.join(" · "))),
      );
    });
  }

  async function resumeKind(button, kind) {
    button.disabled = true;
    try {
      await api(`/kinds/${encodeURIComponent(kind)}/resume`, { method: "POST" });
      button.closest("li").remove();
    } catch (err) {
      if (!(err instanceof AuthNeeded)) button.title = err.message;
      button.disabled = false;
    }
  }

  // Until the first answer, every card says it is loading; when /stats fails, every card says
  // so (and data already shown is marked stale): never an all-clear the page does not know.
  const OVERVIEW_LISTS = ["failing", "unhandled", "workers", "schedules", "flow"];

  function overviewFailed(message) {
    const loaded = document.body.dataset.stats === "loaded" || document.body.dataset.stats === "stale";
    document.body.dataset.stats = loaded ? "stale" : "error";
    if (loaded) return;
    for (const id of OVERVIEW_LISTS) {
      const list = $(id);
      delete list.dataset.key;
      list.replaceChildren(el("li", { class: "error", "data-state": "error" }, message));
    }
    const empty = $("counts-body").querySelector("tr.empty td");
    empty.className = "error";
    empty.dataset.state = "error";
    setText(empty, message);
    setText($("throughput-summary"), message);
  }

  function startOverview() {
    poll(
      async () => {
        const stats = (await api("/stats")).body;
        const empty = $("counts-body").querySelector("tr.empty td");
        if (empty.dataset.state !== "empty") {
          empty.className = "";
          empty.dataset.state = "empty";
          setText(empty, "No jobs yet.");
        }
        renderOverview(stats);
        document.body.dataset.stats = "loaded";
      },
      1000,
      overviewFailed,
    );
  }

  // -- jobs list ---------------------------------------------------------------------------

  const PAGE_SIZE = 25;

  // A job that succeeded has no current error: an earlier attempt's is history (on its page).
  function lastErrorCell(j) {
    const error = j.status === "succeeded" ? null : j.last_error;
    const first = error ? error.split("\n")[0] : "";
    return el("td", { class: "wide", "data-last-error": "" }, el("span", { class: "clip", title: error || "" }, first));
  }

  function startJobs() {
    const params = new URLSearchParams(location.search);
    const filters = { status: params.get("status") || "", kind: params.get("kind") || "", queue: params.get("queue") || "" };
    $("f-status").value = filters.status;
    $("f-kind").value = filters.kind;
    $("f-queue").value = filters.queue;
    const cursors = [null];
    let page = 0;
    let nextCursor = null;

    async function load() {
      const q = new URLSearchParams({ limit: String(PAGE_SIZE) });
      for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
      if (cursors[page]) q.set("cursor", cursors[page]);
      const { body } = await api(`/jobs?${q}`);
      nextCursor = body.next_cursor;
      const rows = body.jobs.map((j) =>
        el(
          "tr",
          { "data-job-id": j.id },
          el("td", {}, el("a", { href: `/ui/jobs/${j.id}`, class: "mono", title: j.id }, j.id.slice(-12))),
          el("td", {}, j.kind),
          el("td", {}, j.queue),
          el("td", {}, badge(j.status)),
          el("td", { class: "num" }, fmtAttempts(j)),
          el("td", { title: j.created_at }, fmtTime(j.created_at)),
          lastErrorCell(j),
        ),
      );
      const key = JSON.stringify(body.jobs.map((j) => [j.id, j.status, j.attempts, j.last_error]));
      const tbody = $("jobs-body");
      if (tbody.dataset.key !== key) {
        tbody.dataset.key = key;
        tbody.replaceChildren(...(rows.length ? rows : [el("tr", { class: "empty" }, el("td", { colspan: "7" }, "No jobs match."))]));
      }
      $("next").disabled = !nextCursor;
      $("prev").disabled = page === 0;
      $("first").disabled = page === 0;
      setText($("page-info"), `page ${page + 1}`);
    }

    const tick = poll(load, 2000);
    $("next").addEventListener("click", () => {
      if (!nextCursor) return;
      cursors[page + 1] = nextCursor;
      page += 1;
      tick();
    });
    $("prev").addEventListener("click", () => { if (page > 0) { page -= 1; tick(); } });
    $("first").addEventListener("click", () => { page = 0; tick(); });
  }

  // -- job detail --------------------------------------------------------------------------

  function startJob() {
    const id = document.body.dataset.jobId;
    let job = null;

    function render(j) {
      job = j;
      const status = $("status");
      status.className = `badge s-${j.status}`;
      status.dataset.status = j.status;
      setText(status, j.status.replace("_", " "));
      setText($("kind"), j.kind);
      setText($("queue"), j.queue);
      setText($("attempts"), fmtAttempts(j));
      setText($("priority"), String(j.priority));
      setText($("cancel-requested"), j.cancel_requested ? "yes" : "no");
      setText($("idempotency-key"), j.idempotency_key || "—");
      // What the handler last reported (ctx.progress), with the attempt that reported it.
      const p = j.progress;
      const bar = $("progress-bar");
      bar.hidden = !p;
      if (p) bar.value = p.fraction;
      setText(
        $("progress-text"),
        p ? `${Math.round(p.fraction * 1000) / 10}%${p.message ? ` · ${p.message}` : ""} (attempt ${p.attempt})` : "—",
      );
      const steps = { created: j.created_at, due: j.run_at, started: j.started_at, finished: j.finished_at };
      for (const [step, at] of Object.entries(steps)) {
        const li = $("timeline").querySelector(`[data-step="${step}"]`);
        const done = Boolean(at) && (step !== "due" || new Date(at) <= new Date());
        li.classList.toggle("done", done);
        const time = li.querySelector("time");
        if (at) time.setAttribute("datetime", at);
        setText(time, at ? `${fmtTime(at)} (${fmtAgo(at)})` : "—");
      }
      setText($("error-count"), j.errors.length ? `${j.errors.length}` : "");
      $("errors").hidden = j.errors.length === 0;
      $("no-errors").hidden = j.errors.length > 0;
      renderItems("errors", j.errors, (e) =>
        el(
          "li",
          { "data-attempt": String(e.attempt) },
          el("div", { class: "when" }, `attempt ${e.attempt} · `, el("time", { datetime: e.at, title: e.at }, fmtTime(e.at))),
          el("pre", {}, e.error),
        ),
      );
      setText($("payload"), JSON.stringify(j.payload, null, 2));
      setText($("result"), j.result === null || j.result === undefined ? "—" : JSON.stringify(j.result, null, 2));
      $("cancel").disabled = TERMINAL.has(j.status) || (j.status === "running" && j.cancel_requested);
      $("retry").disabled = !(j.status === "failed_permanent" || j.status === "cancelled");
    }

    async function load() {
      try {
        render((await api(`/jobs/${encodeURIComponent(id)}`)).body);
      } catch (err) {
        if (err.status === 404 || err.status === 422) {
          setText($("status"), "not found");
          $("cancel").disabled = true;
          $("retry").disabled = true;
        }
        throw err;
      }
    }

    const tick = poll(load, 1000);

    async function act(button, path, describe) {
      button.disabled = true;
      try {
        const { status, body } = await api(path, { method: "POST" });
        setText($("action-result"), describe(status, body));
      } catch (err) {
        if (!(err instanceof AuthNeeded)) setText($("action-result"), err.message);
      }
      tick();
    }

    $("cancel").addEventListener("click", () =>
      act($("cancel"), `/jobs/${id}/cancel`, (status) =>
        status === 202 ? "Cancel requested: the running handler was asked to stop." : "Cancelled.",
      ),
    );
    $("retry").addEventListener("click", () => act($("retry"), `/jobs/${id}/retry`, () => "Queued again."));
    return job;
  }

  // -- start -------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    setupLogin();
    const page = document.body.dataset.page;
    if (page === "overview") startOverview();
    else if (page === "jobs") startJobs();
    else if (page === "job") startJob();
  });
})();
