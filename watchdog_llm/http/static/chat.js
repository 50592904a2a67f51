// The chat page at the public URL: streams through this site's own /v1/chat/completions.
// Everything stays in this browser (localStorage); nothing is fetched from any other host.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEYS = { key: "wdllm.key", chats: "wdllm.chats", current: "wdllm.current", draft: "wdllm.draft", prefs: "wdllm.prefs" };
  // Our 503s while the model is away (README, "The public endpoint") say retryable: wait, then try
  // again on our own, sooner if /health says the model is back. model_failed is not retryable.
  const MAX_CHATS = 50;

  const ui = {
    log: $("log"), message: $("message"), send: $("send"), stop: $("stop"), notice: $("notice"),
    key: $("api-key"), model: $("model"), system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens"),
    settings: $("settings"), settingsToggle: $("settings-toggle"), chats: $("chats"), chatsToggle: $("chats-toggle"),
    chatList: $("chat-list"), state: $("state"), since: $("since"), away: $("away"), modelName: $("model-name"),
  };

  // ---- storage ------------------------------------------------------------------------------
  const load = (k, fallback) => {
    try {
      const v = localStorage.getItem(k);
      return v === null ? fallback : JSON.parse(v);
    } catch (e) {
      return fallback;
    }
  };
  const save = (k, v) => {
    try {
      localStorage.setItem(k, JSON.stringify(v));
    } catch (e) {
      /* storage full or off: the page still works for this visit */
    }
  };

  let chats = load(KEYS.chats, []);
  let current = load(KEYS.current, null);
  let busy = null; // {controller, msg, timer} while a request or a wait is in progress

  const chat = () => chats.find((c) => c.id === current);
  function newChat() {
    const c = { id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`, title: "New chat", messages: [] };
    chats.unshift(c);
    chats = chats.slice(0, MAX_CHATS);
    current = c.id;
    persist();
    return c;
  }
  function persist() {
    save(KEYS.chats, chats);
    save(KEYS.current, current);
  }

  // ---- rendering ----------------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  window.wdCopy = function (text, button) {
    const done = () => {
      const was = button.textContent;
      button.textContent = "Copied";
      setTimeout(() => (button.textContent = was), 1200);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
    } else fallbackCopy(text, done);
  };
  function fallbackCopy(text, done) {
    const t = el("textarea");
    t.value = text;
    document.body.appendChild(t);
    t.select();
    try {
      document.execCommand("copy");
      done();
    } finally {
      t.remove();
    }
  }

  function renderChatList() {
    ui.chatList.replaceChildren();
    for (const c of chats) {
      const li = el("li");
      li.setAttribute("aria-current", String(c.id === current));
      const open = el("button", "open", c.title);
      open.type = "button";
      open.addEventListener("click", () => {
        if (busy) return;
        current = c.id;
        persist();
        renderAll();
        ui.chats.classList.remove("open");
      });
      const del = el("button", "delete", "×");
      del.type = "button";
      del.setAttribute("aria-label", `Delete chat ${c.title}`);
      del.addEventListener("click", () => {
        if (busy && c.id === current) return;
        chats = chats.filter((x) => x.id !== c.id);
        if (current === c.id) current = chats.length ? chats[0].id : null;
        persist();
        renderAll();
      });
      li.append(open, del);
      ui.chatList.appendChild(li);
    }
  }

  function renderMessage(m, index, last) {
    const box = el("div", `msg ${m.role}`);
    box.appendChild(el("div", "who", m.role === "user" ? "You" : m.model || "Model"));
    const body = el("div", "body");
    if (m.role === "user") body.textContent = m.content;
    else {
      if (m.reasoning) {
        const d = el("details", "thinking");
        const secs = m.thinkingMs ? ` (${(m.thinkingMs / 1000).toFixed(1)} s)` : m.content ? "" : "…";
        d.appendChild(el("summary", null, `Thinking${secs}`));
        d.appendChild(el("div", "text", m.reasoning));
        body.appendChild(d);
      }
      body.appendChild(window.renderMarkdown(m.content || ""));
      if (m.waiting) body.appendChild(el("p", "waiting", m.waiting));
      if (m.error) body.appendChild(el("p", "error", m.error));
    }
    box.appendChild(body);
    if (m.role === "assistant" && !m.pending) {
      const meta = el("div", "meta");
      if (m.stats) meta.appendChild(el("span", "stats", m.stats));
      if (m.stopped) meta.appendChild(el("span", null, "stopped"));
      const copy = el("button", null, "Copy");
      copy.type = "button";
      copy.addEventListener("click", () => window.wdCopy(m.content || "", copy));
      meta.appendChild(copy);
      if (last) {
        const again = el("button", null, "Regenerate");
        again.type = "button";
        again.addEventListener("click", () => regenerate(index));
        meta.appendChild(again);
      }
      box.appendChild(meta);
    }
    return box;
  }

  function renderLog() {
    const c = chat();
    const atEnd = ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 40;
    ui.log.replaceChildren();
    if (c) c.messages.forEach((m, i) => ui.log.appendChild(renderMessage(m, i, i === c.messages.length - 1)));
    if (atEnd) ui.log.scrollTop = ui.log.scrollHeight;
  }
  // While an answer streams only its own box is rebuilt, once per frame: a long conversation costs
  // nothing per token.
  let frame = 0;
  const renderSoon = () => {
    if (!frame) frame = requestAnimationFrame(() => ((frame = 0), renderLast()));
  };
  function renderLast() {
    const c = chat();
    if (!c || !c.messages.length || ui.log.childElementCount !== c.messages.length) return renderLog();
    const atEnd = ui.log.scrollHeight - ui.log.scrollTop - ui.log.clientHeight < 40;
    const i = c.messages.length - 1;
    ui.log.lastElementChild.replaceWith(renderMessage(c.messages[i], i, true));
    if (atEnd) ui.log.scrollTop = ui.log.scrollHeight;
  }
  function renderAll() {
    renderChatList();
    renderLog();
    ui.send.hidden = !!busy;
    ui.stop.hidden = !busy;
  }

  function notice(text) {
    ui.notice.textContent = text || "";
    ui.notice.hidden = !text;
  }

  // ---- the header: online or away, from /health ---------------------------------------------
  let healthTimer = 0;
  async function refreshHealth() {
    clearTimeout(healthTimer);
    let next = 15000;
    try {
      const r = await fetch("/health", { cache: "no-store" });
      const h = await r.json();
      const up = r.ok && h.status === "ok";
      ui.state.textContent = up ? "online" : "offline";
      ui.state.className = up ? "online" : "offline";
      if (h.model) ui.modelName.textContent = h.model;
      ui.away.textContent = up ? "" : `${h.message}.`;
      ui.away.hidden = up;
      if (!up) next = Math.min(Math.max(Number(r.headers.get("Retry-After")) || 5, 2), 30) * 1000;
      if (busy && busy.retry) next = 3000; // someone waits for the model: look often
      if (up && busy && busy.retry) busy.retry();
    } catch (e) {
      ui.state.textContent = "unreachable";
      ui.state.className = "offline";
      ui.away.textContent = "The gateway cannot be reached (the node, the tunnel or your network); retrying.";
      ui.away.hidden = false;
      next = 5000;
    }
    healthTimer = setTimeout(refreshHealth, next);
  }

  // ---- requests -----------------------------------------------------------------------------
  const key = () => (ui.key.value || "").trim();
  const auth = () => (key() ? { Authorization: `Bearer ${key()}` } : {});

  async function loadModels() {
    try {
      const used = key();
      const r = await fetch("/v1/models", { headers: auth(), cache: "no-store" });
      if (used !== key()) return false; // the key changed meanwhile: its own request answers
      if (r.status === 401) return explain401();
      if (!r.ok) return false;
      const data = (await r.json()).data || [];
      const prefs = load(KEYS.prefs, {});
      // A catalog model not loaded now is loaded when asked for (the first answer waits for it).
      const option = (m) => {
        const o = el("option", null, m.watchdog_llm && m.watchdog_llm.loaded === false ? `${m.id} (loads on request)` : m.id);
        o.value = m.id;
        return o;
      };
      ui.model.replaceChildren(...data.map(option));
      if (prefs.model && data.some((m) => m.id === prefs.model)) ui.model.value = prefs.model;
      if (!ui.notice.dataset.kind || ui.notice.dataset.kind === "401") notice("");
      return true;
    } catch (e) {
      return false; // the header says when the gateway is unreachable
    }
  }

  function explain401() {
    ui.notice.dataset.kind = "401";
    notice(
      key()
        ? "The gateway refused this API key (401). Check it in Settings: it is the key you were given for this endpoint."
        : "This endpoint needs an API key (401). Enter the key you were given under Settings → API key."
    );
    openSettings(true);
    ui.key.focus();
  }

  function openSettings(open) {
    ui.settings.hidden = !open;
    ui.settingsToggle.setAttribute("aria-expanded", String(open));
  }

  function requestBody(c, model) {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const m of c.messages) {
      if (m.pending || (m.role === "assistant" && m.error && !m.content)) continue;
      messages.push({ role: m.role, content: m.content });
    }
    const body = { model, messages, stream: true, stream_options: { include_usage: true } };
    const t = parseFloat(ui.temperature.value);
    if (!Number.isNaN(t)) body.temperature = t;
    const n = parseInt(ui.maxTokens.value, 10);
    if (n > 0) body.max_tokens = n;
    return body;
  }

  // One attempt; a wait (away, 429, unreachable) ends in another attempt unless Stop is pressed.
  async function attempt(c, m, tries) {
    const controller = new AbortController();
    busy = { controller, msg: m, timer: 0 };
    renderAll();
    const model = ui.model.value || m.model || "";
    m.model = model;
    let r;
    try {
      r = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...auth() },
        body: JSON.stringify(requestBody(c, model)),
        signal: controller.signal,
      });
    } catch (e) {
      if (controller.signal.aborted) return finish(c, m, { stopped: true });
      const wait = Math.min(2 ** tries, 30);
      return retryLater(c, m, tries, wait, "The gateway cannot be reached (the node, the tunnel or your network)");
    }
    if (!r.ok) return failed(c, m, r, tries);
    m.waiting = "";
    notice("");
    try {
      await readStream(r, m);
      return finish(c, m, {});
    } catch (e) {
      if (controller.signal.aborted) return finish(c, m, { stopped: true });
      m.error = "The connection was lost mid-answer; this response is incomplete.";
      return finish(c, m, {});
    }
  }

  async function failed(c, m, r, tries) {
    let err = {};
    try {
      err = (await r.json()).error || {};
    } catch (e) {
      /* not our JSON: a proxy in between answered */
    }
        const text = (typeof err === "object" && err.message) || `HTTP ${r.status}`;
    const after = Number(r.headers.get("Retry-After")) || 0;
    if (r.status === 401) {
      explain401();
      return unsend(c, m);
    }
    if (r.status === 503 && err.retryable !== false) {
      retryLater(c, m, tries, Math.min(Math.max(after, 2), 300), text);
      return refreshHealth();
    }
    if (r.status === 429) return retryLater(c, m, tries, Math.min(Math.max(after, 1), 60), `Too many requests at once for this key: ${text}`);
    if (r.status === 413) {
      notice(`This message is too large for the endpoint (${text}). Shorten it or attach less text.`);
      return unsend(c, m);
    }
    if ((r.status === 502 || r.status === 504) && tries < 3) {
      return retryLater(c, m, tries, Math.min(Math.max(after, 2 ** tries), 30), text);
    }
    m.error = `${text} (HTTP ${r.status})`;
    return finish(c, m, {});
  }

  // Never lose what the user typed: a request refused outright puts the text back in the box.
  function unsend(c, m) {
    const i = c.messages.indexOf(m);
    const user = c.messages[i - 1];
    c.messages.splice(i - 1, 2);
    if (user && !ui.message.value) ui.message.value = user.content;
    saveDraft();
    busy = null;
    persist();
    renderAll();
  }

  function retryLater(c, m, tries, seconds, why) {
    let left = Math.round(seconds);
    const tick = () => {
      if (!busy || busy.msg !== m) return;
      if (left <= 0) return busy.retry();
      m.waiting = `${why}. Trying again in ${left} s…`;
      left -= 1;
      renderSoon();
      busy.timer = setTimeout(tick, 1000);
    };
    busy = { controller: null, msg: m, timer: 0, retry: null };
    busy.retry = () => {
      clearTimeout(busy.timer);
      busy.retry = null;
      attempt(c, m, tries + 1);
    };
    renderAll();
    tick();
  }

  async function readStream(r, m) {
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    const t0 = performance.now();
    let buf = "";
    let firstToken = 0;
    let thinkStart = 0;
    let chunks = 0;
    let usage = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data || data === "[DONE]") continue;
        let obj;
        try {
          obj = JSON.parse(data);
        } catch (e) {
          continue;
        }
        if (obj.error) {  // our event when the model went away mid-answer (a yield, a crash)
          m.error = obj.error.message || "The answer ended with an error.";
          refreshHealth();
          continue;
        }
        if (obj.usage) usage = obj.usage;
        const delta = (obj.choices && obj.choices[0] && obj.choices[0].delta) || {};
        const thought = delta.reasoning || delta.reasoning_content;
        if (thought) {
          if (!thinkStart) thinkStart = performance.now();
          m.reasoning = (m.reasoning || "") + thought;
          chunks++;
        }
        if (delta.content) {
          if (!firstToken) firstToken = performance.now();
          if (thinkStart && !m.thinkingMs) m.thinkingMs = performance.now() - thinkStart;
          m.content += delta.content;
          chunks++;
        }
        renderSoon();
      }
    }
    const end = performance.now();
    const start = thinkStart || firstToken || end;
    const tokens = usage ? usage.completion_tokens : chunks;
    const rate = end > start && tokens > 1 ? ` · ${((tokens - 1) / ((end - start) / 1000)).toFixed(1)} tokens/s` : "";
    const prompt = usage ? `${usage.prompt_tokens} in · ` : "";
    m.stats = `${prompt}${tokens} tokens out${rate} · ${((end - t0) / 1000).toFixed(1)} s`;
    if (thinkStart && !m.thinkingMs) m.thinkingMs = end - thinkStart;
  }

  function finish(c, m, how) {
    if (busy && busy.timer) clearTimeout(busy.timer);
    m.pending = false;
    m.waiting = "";
    if (how.stopped) m.stopped = true;
    busy = null;
    persist();
    renderAll();
    ui.message.focus();
  }

  function send(text) {
    if (busy) return;
    const c = chat() || newChat();
    if (!c.messages.length) c.title = text.slice(0, 60);
    c.messages.push({ role: "user", content: text });
    const m = { role: "assistant", content: "", pending: true, model: ui.model.value };
    c.messages.push(m);
    persist();
    attempt(c, m, 0);
  }

  function regenerate(index) {
    const c = chat();
    if (busy || !c) return;
    c.messages.splice(index, 1);
    const m = { role: "assistant", content: "", pending: true, model: ui.model.value };
    c.messages.push(m);
    attempt(c, m, 0);
  }

  function stop() {
    if (!busy) return;
    const { controller, msg } = busy;
    if (controller) controller.abort();
    else {
      // Stopped while waiting for the model: nothing was answered, so the question goes back to the box.
      const c = chat();
      if (busy.timer) clearTimeout(busy.timer);
      if (c && !msg.content) return unsend(c, msg);
      finish(c, msg, { stopped: true });
    }
  }

  const saveDraft = () => save(KEYS.draft, ui.message.value);
  const savePrefs = () =>
    save(KEYS.prefs, { model: ui.model.value, system: ui.system.value, temperature: ui.temperature.value, maxTokens: ui.maxTokens.value });

  // ---- wiring -------------------------------------------------------------------------------
  function init() {
    ui.key.value = load(KEYS.key, "");
    ui.message.value = load(KEYS.draft, "");
    const prefs = load(KEYS.prefs, {});
    ui.system.value = prefs.system || "";
    ui.temperature.value = prefs.temperature || "";
    ui.maxTokens.value = prefs.maxTokens || "";
    // A conversation whose answer was cut by leaving the page is not waiting any more.
    for (const c of chats) for (const m of c.messages) if (m.pending) Object.assign(m, { pending: false, waiting: "", stopped: true });
    if (!chat()) current = chats.length ? chats[0].id : null;
    openSettings(!key());

    document.getElementById("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = ui.message.value.trim();
      if (!text || busy) return;
      ui.message.value = "";
      saveDraft();
      send(text);
    });
    ui.message.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        document.getElementById("composer").requestSubmit();
      }
    });
    ui.message.addEventListener("input", saveDraft);
    ui.stop.addEventListener("click", stop);
    $("new-chat").addEventListener("click", () => {
      if (busy) return;
      newChat();
      renderAll();
      ui.message.focus();
    });
    ui.key.addEventListener("change", async () => {
      save(KEYS.key, key());
      if (await loadModels()) openSettings(false); // the key works: make room for the conversation
    });
    for (const input of [ui.model, ui.system, ui.temperature, ui.maxTokens]) input.addEventListener("change", savePrefs);
    ui.settingsToggle.addEventListener("click", () => openSettings(ui.settings.hidden));
    ui.chatsToggle.addEventListener("click", () => {
      const open = ui.chats.classList.toggle("open");
      ui.chatsToggle.setAttribute("aria-expanded", String(open));
    });
    renderAll();
    refreshHealth();
    if (key()) loadModels(); // without one, the settings are open at the key field already
  }

  init();
})();
