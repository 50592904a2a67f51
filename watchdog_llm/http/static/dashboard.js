// The operator dashboard: reads the admin API, follows GET /api/events, and acts with the
// session's CSRF token. Every value from the daemon goes into the page as text, never as markup.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const TIMELINE_MAX = 60;
  let status = null;
  let lastPhase = null;

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function when(t) {
    if (!t) return "—";
    return new Date(t * 1000).toLocaleString();
  }

  function span(s) {
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
  }

  function gib(bytes) {
    return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
  }

  function notice(text) {
    const n = $("notice");
    n.textContent = text;
    n.hidden = !text;
  }

  async function api(method, path, body) {
    const init = { method, headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    if (r.status === 401) {
      location.reload(); // the session ended (daemon restarted, or signed out elsewhere): the sign-in page
      throw new Error("signed out");
    }
    let data = null;
    try {
      data = await r.json();
    } catch (_) {
      data = null;
    }
    if (!r.ok) {
      const msg = data && data.message ? data.message : `${method} ${path}: HTTP ${r.status}`;
      const err = new Error(msg);
      err.status = r.status;
      err.body = data;
      throw err;
    }
    return data;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      if (c instanceof Node) td.append(c);
      else td.textContent = c === null || c === undefined ? "—" : String(c);
      tr.append(td);
    }
    return tr;
  }

  function facts(dl, pairs) {
    dl.replaceChildren();
    for (const [k, v] of pairs) {
      if (v === undefined) continue;
      dl.append(el("dt", k), el("dd", v === null || v === "" ? "—" : v));
    }
  }

  // ---- status ---------------------------------------------------------------------------------

  function showStatus(st) {
    status = st;
    $("node").textContent = st.node;
    document.title = `${st.node} · ${st.state} · watchdog-llm`;
    const phase = $("phase");
    phase.textContent = st.state;
    phase.className = `phase ${st.state}`;
    $("reason").textContent = st.reason;
    const served = st.serving_since ? span(Date.now() / 1000 - st.serving_since) : null;
    const g = st.gpus || {};
    facts($("facts"), [
      ["model", st.model_id && st.model_id !== st.model ? `${st.model} (${st.model_id})` : st.model],
      ["since", when(st.since)],
      ["serving for", served],
      ["jobs", (st.jobs || []).length ? st.jobs.join(", ") : "none"],
      ["our GPUs", (g.ours || []).length ? g.ours.join(", ") : "none"],
      ["busy GPUs", (g.busy || []).length ? g.busy.join(", ") : "none"],
      ["model processes", (st.model_pids || []).length],
      ["run", st.model_run],
      ["public URL", st.public_url],
      ["tunnel", st.tunnel ? `${st.tunnel.state}${st.tunnel.url ? " " + st.tunnel.url : ""}` : "off"],
      ["served in all", span(st.served_s || 0)],
      ["webhooks", st.webhooks ? `${st.webhooks.delivered} delivered, ${st.webhooks.failed} failed, ${st.webhooks.queued} queued` : "none"],
      ["notifications", st.notifications ? `${st.notifications.sent} sent, ${st.notifications.failed} failed` : "none"],
      ["version", st.version],
    ]);
    const y = st.last_yield;
    if (y) {
      const ms = (v) => (v === null || v === undefined ? null : `${Number(v).toFixed(1)} ms`);
      facts($("yield-facts"), [
        ["at", when(y.detected_at)],
        ["job", y.job || "—"],
        ["cause", y.cause],
        ["detection", ms(y.detect_ms)],
        ["tree gone", ms(y.stop_ms)],
        ["GPUs released", ms(y.gpu_release_ms)],
        ["GPUs", (y.gpus || []).join(", ")],
      ]);
    } else {
      facts($("yield-facts"), [["", "no yield since the daemon started"]]);
    }
    showLock(st.lock);
    if (lastPhase !== st.state) {
      if (lastPhase !== null) addEvent("phase", `${lastPhase} → ${st.state}: ${st.reason}`);
      lastPhase = st.state;
      loadModels();
    }
  }

  function showLock(lock) {
    const banner = $("lock-banner");
    if (!lock || !lock.locked) {
      banner.hidden = true;
      return;
    }
    const why = lock.reason ? ` (${lock.reason})` : "";
    $("lock-text").textContent = `Swap lock held by ${lock.holder}${why} until ${when(lock.expires_at)}: swaps need its token.`;
    banner.hidden = false;
  }

  $("force-release").addEventListener("click", async () => {
    const holder = status && status.lock ? status.lock.holder : "its holder";
    if (!confirm(`Release the swap lock of ${holder} by force? Their next swap will be refused.`)) return;
    try {
      const lock = await api("DELETE", "/api/swap/lock?force=true");
      showLock(lock);
      notice("");
    } catch (e) {
      notice(`Could not release the lock: ${e.message}`);
    }
  });

  // ---- models and swaps -----------------------------------------------------------------------

  async function loadModels() {
    let d;
    try {
      d = await api("GET", "/api/models");
    } catch (e) {
      notice(`Could not read the catalog: ${e.message}`);
      return;
    }
    const rows = $("model-rows");
    rows.replaceChildren();
    for (const m of d.models) {
      let action;
      const entry = status && status.catalog ? status.catalog.find((e) => e.name === m.name) : null;
      const waiting = entry && entry.waiting ? ` · ${entry.waiting} waiting` : "";
      if (m.active) {
        action = el("span", `${entry ? entry.state : "active"}${waiting}`, "active");
      } else {
        action = el("button", "Swap");
        action.type = "button";
        action.setAttribute("aria-label", `Swap to ${m.name}`);
        action.addEventListener("click", () => swap(m.name));
      }
      const name = el("span", m.name);
      if (m.description) name.title = m.description;
      const check = el("button", "Check");
      check.type = "button";
      check.setAttribute("aria-label", `Check ${m.name}`);
      check.addEventListener("click", () => validate(m.name));
      const actions = el("span", null, "actions");
      actions.append(action, " ", check);
      if (!m.active && waiting) actions.append(el("span", waiting, "muted"));
      rows.append(row([name, m.model, m.gpus ?? "default", actions]));
    }
  }

  async function validate(name) {
    const box = $("check-box");
    box.hidden = false;
    $("check-title").textContent = `Check ${name}: …`;
    $("check-list").replaceChildren();
    $("check-command").textContent = "";
    let d;
    try {
      d = await api("POST", `/api/swap/${encodeURIComponent(name)}/validate`);
    } catch (e) {
      $("check-title").textContent = `Check ${name}: ${e.message}`;
      return;
    }
    $("check-title").textContent = `Check ${name}: ${d.ok ? "can start" : "cannot start"}`;
    for (const c of d.checks) $("check-list").append(el("li", `${c.ok ? "ok" : "FAILED"} ${c.check}: ${c.detail}`, c.ok ? "" : "bad"));
    $("check-command").textContent = d.command.join(" ");
  }

  let swapSource = null;

  async function swap(name) {
    notice("");
    let rec;
    try {
      rec = await api("POST", "/api/swap", { model: name });
    } catch (e) {
      notice(`Swap to ${name} refused: ${e.message}`);
      return;
    }
    follow(rec);
  }

  function follow(rec) {
    const box = $("swap-box"), out = $("swap-log");
    box.hidden = false;
    out.textContent = "";
    $("swap-title").textContent = `Swap to ${rec.model}: ${rec.state}`;
    if (swapSource) swapSource.close();
    const src = new EventSource(`/api/swap/${encodeURIComponent(rec.id)}/stream`);
    swapSource = src;
    src.addEventListener("log", (ev) => {
      const near = out.scrollTop + out.clientHeight >= out.scrollHeight - 8;
      out.append(JSON.parse(ev.data).line + "\n");
      if (near) out.scrollTop = out.scrollHeight;
    });
    src.addEventListener("state", (ev) => {
      const s = JSON.parse(ev.data);
      $("swap-title").textContent = `Swap to ${s.model || rec.model}: ${s.state}${s.detail ? " (" + s.detail + ")" : ""}`;
      if (s.state === "ready" || s.state === "failed") {
        src.close();
        loadModels();
      }
    });
    src.addEventListener("end", (ev) => {
      $("swap-title").textContent += ` (${JSON.parse(ev.data).detail})`;
      src.close();
    });
  }

  // ---- the live stream ------------------------------------------------------------------------

  function addEvent(kind, text, at) {
    const list = $("timeline");
    const li = el("li");
    li.append(el("time", new Date((at || Date.now() / 1000) * 1000).toLocaleTimeString()), " ", el("span", kind, "kind"), " ", el("span", text));
    list.prepend(li);
    while (list.children.length > TIMELINE_MAX) list.lastChild.remove();
  }

  const DESCRIBE = {
    notice: (d) => `${d.title}${d.body ? ": " + d.body : ""}`,
    swap: (d) => `swap ${d.id} to ${d.model}: ${d.state}${d.detail ? " (" + d.detail + ")" : ""}`,
    lock_acquired: (d) => `swap lock taken by ${d.holder}${d.reason ? " (" + d.reason + ")" : ""}`,
    lock_released: (d) => `swap lock of ${d.holder} released`,
    lock_forced: (d) => `swap lock of ${d.holder} released by force`,
    // yielded, resumed, crashed and swap ends come as notices too: told once, as notices.
    swap_complete: null,
    swap_failed: null,
  };

  // An event told twice (history again after a reconnect that had no id to send) is shown once.
  // Ids start again when the daemon restarts: the time goes with them.
  const shown = new Set();
  function seen(ev, d) {
    const key = `${ev.lastEventId}@${d.at}`;
    if (shown.has(key)) return true;
    shown.add(key);
    return false;
  }

  function connect() {
    // History once: a reconnect sends Last-Event-ID, and the server then replays only what was missed.
    const src = new EventSource(`/api/events?history=${TIMELINE_MAX}`);
    src.onopen = () => {
      $("live").textContent = "live";
      $("live").className = "on";
    };
    src.onerror = () => {
      $("live").textContent = "reconnecting…";
      $("live").className = "off";
      // A closed stream (the daemon stopped, or signed out): EventSource retries on its own;
      // a 401 closes it for good, so ask whether we are still signed in.
      if (src.readyState === EventSource.CLOSED) {
        fetch("/api/status", { credentials: "same-origin" }).then((r) => {
          if (r.status === 401) location.reload();
          else setTimeout(connect, 2000);
        }, () => setTimeout(connect, 2000));
      }
    };
    src.addEventListener("status", (ev) => showStatus(JSON.parse(ev.data)));
    for (const name of Object.keys(DESCRIBE)) {
      if (name === "notice") continue;
      src.addEventListener(name, (ev) => {
        const d = JSON.parse(ev.data);
        if (seen(ev, d)) return;
        if (name === "swap") {
          // Progress: the swap log shows it. A swap someone else started is followed here too.
          const ended = d.state === "ready" || d.state === "failed";
          if (!ended && (!swapSource || swapSource.readyState === EventSource.CLOSED)) follow(d);
          return;
        }
        if (name === "swap_complete" || name === "swap_failed") loadModels();
        if (name.startsWith("lock_")) loadLock();
        if (DESCRIBE[name]) addEvent(name, DESCRIBE[name](d), d.at);
      });
    }
    src.addEventListener("notice", (ev) => {
      const d = JSON.parse(ev.data);
      if (seen(ev, d)) return;
      addEvent(d.kind, DESCRIBE.notice(d), d.at);
    });
  }

  async function loadLock() {
    try {
      showLock(await api("GET", "/api/swap/lock"));
    } catch (_) {
      /* the next status event shows it */
    }
  }

  // ---- GPUs, schedule, connectivity, logs (read on load and now and then) -----------------------

  async function loadGpus() {
    const d = await api("GET", "/api/gpus");
    const rows = $("gpu-rows");
    rows.replaceChildren();
    for (const g of d.gpus) {
      const who = g.ours ? "ours" : g.busy ? "someone else's process" : g.processes.length ? "processes" : "free";
      rows.append(row([g.minor, g.name, `${gib(g.memory_used)} of ${gib(g.memory_total)}`, who]));
    }
    $("gpu-note").textContent = d.error ? d.error : d.view ? `from ${d.view}` : "";
  }

  let lastCounts = null;

  async function loadRequests() {
    const d = await api("GET", "/api/requests");
    const now = Date.now() / 1000;
    const rows = $("request-rows");
    rows.replaceChildren();
    const names = Object.keys(d.consumers).sort();
    for (const name of names) {
      const c = d.consumers[name];
      let rate = "—";
      if (lastCounts && lastCounts.counts[name] !== undefined && now > lastCounts.at) {
        rate = (((c.requests - lastCounts.counts[name]) * 60) / (now - lastCounts.at)).toFixed(1);
      }
      const k = c.by_class;
      const lat = c.latency_mean_ms === null ? "—" : `${c.latency_mean_ms} ms${c.latency_p95_le_ms ? ", ≤ " + c.latency_p95_le_ms + " ms" : ""}`;
      rows.append(row([name || "(no valid key)", c.requests, rate, `${k["2xx"] || 0} / ${k["4xx"] || 0} / ${k["5xx"] || 0}`, lat]));
    }
    if (!names.length) rows.append(row(["no requests yet", "", "", "", ""]));
    lastCounts = { at: now, counts: Object.fromEntries(names.map((n) => [n, d.consumers[n].requests])) };
  }

  async function loadSchedule() {
    const d = await api("GET", "/api/schedule");
    const rows = $("schedule-rows");
    rows.replaceChildren();
    for (const e of d.entries) rows.append(row([e.id, e.action, e.cron || e.next_run, e.owner]));
    if (!d.entries.length) rows.append(row(["nothing scheduled", "", "", ""]));
  }

  async function loadConnectivity() {
    const d = await api("GET", "/api/connectivity?limit=20");
    const rows = $("conn-rows");
    rows.replaceChildren();
    for (const e of d.events.slice().reverse()) {
      const result = e.ok ? `ok${e.ms !== null && e.ms !== undefined ? " " + Math.round(e.ms) + " ms" : ""}` : `failed: ${e.error || "unreachable"}`;
      rows.append(row([when(e.at), e.service, e.source, result]));
    }
    if (!d.events.length) rows.append(row(["no reports", "", "", ""]));
  }

  async function loadLog() {
    const name = $("log-name").value;
    try {
      const d = await api("GET", `/api/logs/${encodeURIComponent(name)}?lines=200`);
      const out = $("log-tail");
      out.textContent = d.lines.length ? d.lines.join("\n") : `(the ${name} log is empty)`;
      out.scrollTop = out.scrollHeight;
    } catch (e) {
      $("log-tail").textContent = `Could not read the log: ${e.message}`;
    }
  }

  $("log-refresh").addEventListener("click", loadLog);
  $("log-name").addEventListener("change", loadLog);
  $("sign-out").addEventListener("click", async () => {
    try {
      await api("POST", "/logout");
    } finally {
      location.reload();
    }
  });

  async function slow() {
    for (const f of [loadGpus, loadRequests, loadSchedule, loadConnectivity]) {
      try {
        await f();
      } catch (_) {
        /* shown as stale; the next round tries again */
      }
    }
  }

  connect();
  loadModels();
  loadLog();
  slow();
  setInterval(slow, 10000);
  setInterval(() => status && showLock(status.lock && status.lock.expires_at * 1000 > Date.now() ? status.lock : null), 5000);
})();
