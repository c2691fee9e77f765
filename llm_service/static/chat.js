// The FastTalk chat page: one WebSocket to /ws/llm on the same host, frames as in the README.
// Model output is only ever set as text (textContent / Text nodes), never parsed as HTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    conn: $("conn"), session: $("session-id"), health: $("health"), engine: $("engine"),
    healthStatus: $("health-status"), transcript: $("transcript"), log: $("log"),
    empty: $("empty"),
    banner: $("banner"), bannerText: $("banner-text"), reconnect: $("reconnect"),
    composer: $("composer"), input: $("input"), send: $("send"), stop: $("stop"),
    settings: $("settings-form"), systemPrompt: $("system-prompt"), temperature: $("temperature"),
    maxTokens: $("max-tokens"), chunking: $("chunking"), apiKey: $("api-key"),
    apply: $("apply"),
  };
  const KEY_STORE = "fasttalk.apiKey";
  // What a Sec-WebSocket-Protocol entry may hold (an RFC 7230 token).
  const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

  let ws = null; // the live socket, or null
  let connected = false; // session_started received on `ws`
  let reply = null; // the reply streaming now: { node, text, meta, tokens }
  let stopping = false;
  let applied = null; // the config last applied; sent again after a reconnect
  let usedKey = ""; // the API key the current connection presented
  let voice = false; // the session's chunking is clause or sentence: one line per piece

  // ---- connection ----------------------------------------------------------------------

  // Paths are relative to the page, so the page also works behind a proxy under a prefix.
  function socketUrl() {
    const url = new URL("ws/llm", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

  function connect() {
    const key = el.apiKey.value.trim();
    if (key && !TOKEN.test(key)) {
      showError("invalid_api_key", "an API key may hold only letters, digits and !#$%&'*+-.^_`|~");
      disconnected("Not connected: fix the API key under Settings, then reconnect.");
      return;
    }
    usedKey = key;
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    setConn("connecting", "connecting…");
    el.banner.hidden = true;
    // The key travels once, as a subprotocol (browsers cannot set headers on a WebSocket,
    // and a URL ends up in logs); the server answers with the entry that is not the key.
    const socket = key
      ? new WebSocket(socketUrl(), ["fasttalk", "bearer." + key])
      : new WebSocket(socketUrl());
    ws = socket;
    let opened = false;
    socket.addEventListener("open", () => {
      opened = true;
    });
    socket.addEventListener("message", (event) => {
      if (socket === ws) onFrame(JSON.parse(event.data));
    });
    socket.addEventListener("close", (event) => {
      if (socket === ws) onClose(event, opened);
    });
    loadHealth();
  }

  function reconnect() {
    if (ws) {
      const old = ws;
      ws = null;
      old.close(1000);
    }
    connected = false;
    connect();
  }

  function send(frame) {
    if (ws && connected) ws.send(JSON.stringify(frame));
  }

  function onClose(event, opened) {
    ws = null;
    connected = false;
    if (reply) finishReply("interrupted", null, "connection lost");
    const why = event.reason ? `: ${event.reason}` : "";
    if (!opened) {
      disconnected(`Could not connect (code ${event.code}).`);
      explainRefusal(event.code);
      return;
    }
    disconnected(`Disconnected (code ${event.code}${why}).`);
  }

  // A refused handshake tells a browser nothing (code 1006): ask /stats, which needs the key
  // too (asked without it: the key goes only into the handshake), whether a key is required.
  async function explainRefusal(code) {
    let status = 0;
    let error = {};
    try {
      const response = await fetch(new URL("stats", location.href), { cache: "no-store" });
      status = response.status;
      if (!response.ok) error = (await response.json()).error || {};
    } catch (_) {
      status = 0; // the service is not answering at all
    }
    if (ws) return; // reconnected meanwhile
    if (status === 401) {
      showError("unauthorized", usedKey
        ? "the service refused this API key (or this page's origin)"
        : "the service needs an API key", true);
      el.bannerText.textContent = `Could not connect (code ${code}): ` +
        "Set the API key under Settings, then reconnect.";
    } else if (status === 429) {
      showError(error.code || "rate_limited", error.message || "too many failed attempts", true);
      el.bannerText.textContent = `Could not connect (code ${code}): ` +
        "too many failed API key attempts from this address; wait a minute, then reconnect.";
    } else {
      el.bannerText.textContent = `Could not connect (code ${code}): the service is down, or ` +
        `it refuses this page's origin (LLM_ALLOWED_ORIGINS must then list ${location.origin}).`;
    }
  }

  function disconnected(text) {
    setConn("disconnected", "disconnected");
    el.bannerText.textContent = text;
    const stick = nearBottom();
    el.banner.hidden = false; // the banner takes room from the transcript: keep its end in view
    scrollDown(stick);
    updateControls();
    const active = document.activeElement;
    if (!active || active === document.body || el.composer.contains(active)) el.reconnect.focus();
  }

  function setConn(state, text) {
    el.conn.dataset.state = state;
    el.conn.textContent = text;
  }

  // ---- frames from the service ---------------------------------------------------------

  function onFrame(frame) {
    switch (frame.type) {
      case "session_started":
        connected = true;
        el.session.textContent = frame.session_id;
        setConn("connected", "connected");
        if (applied) send({ type: "start_session", config: applied });
        updateControls();
        if (document.activeElement === el.reconnect || document.activeElement === document.body) {
          el.input.focus();
        }
        break;
      case "session_configured":
        el.session.textContent = frame.session_id;
        voice = (frame.config.chunking || "none") !== "none";
        addNote(`New conversation · ${describeConfig(frame.config)}`);
        break;
      case "token":
        if (reply) appendToken(frame.data);
        break;
      case "response_complete":
        if (reply) finishReply("complete", frame.stats, null);
        break;
      case "cancelled":
        if (frame.success && reply) finishReply("interrupted", frame.stats, null);
        stopping = false;
        updateControls();
        break;
      case "error":
        onError(frame.error || {});
        break;
      default:
        break; // session_ended, history: nothing to show
    }
  }

  function onError(error) {
    const code = error.code || "error";
    // The reply goes on after generation_in_progress; every other error ends it.
    if (reply && code !== "generation_in_progress") {
      if (reply.tokens === 0) {
        reply.node.remove();
        reply = null;
        stopping = false;
      } else {
        finishReply("incomplete", null, "stopped by an error");
      }
    }
    showError(code, error.message || "", error.recoverable === false);
    updateControls();
    loadHealth();
  }

  // ---- the transcript ------------------------------------------------------------------

  function addItem(className, label) {
    el.empty.hidden = true;
    const node = document.createElement("article");
    node.className = `msg ${className}`;
    const who = document.createElement("h2");
    who.className = "who";
    who.textContent = label;
    node.append(who);
    el.log.append(node);
    return node;
  }

  function addText(node, text) {
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    node.append(body);
    return body;
  }

  function addNote(text) {
    const node = document.createElement("p");
    node.className = "note";
    node.textContent = text;
    el.log.append(node);
    scrollDown(true);
  }

  function showError(code, message, fatal) {
    const node = addItem("error", "Error");
    const body = addText(node, "");
    const strong = document.createElement("code");
    strong.textContent = code;
    body.append(strong, document.createTextNode(` ${message}`));
    if (fatal) body.append(document.createTextNode(" (the service closes the connection)"));
    scrollDown(true);
  }

  function startReply(text) {
    addText(addItem("user", "You"), text);
    const node = addItem("assistant", "Assistant");
    node.setAttribute("aria-busy", "true");
    node.classList.add("streaming");
    const body = addText(node, "");
    const meta = document.createElement("p");
    meta.className = "meta";
    meta.textContent = voice ? "waiting for the first piece…" : "waiting for the first token…";
    node.append(meta);
    // In the voice view each token frame is a piece as a speech engine would get it: a line
    // of its own, in a list that still reads as the whole reply.
    const lines = voice ? body.appendChild(document.createElement("ol")) : null;
    if (lines) lines.className = "chunks";
    const run = lines ? null : body.appendChild(document.createTextNode(""));
    reply = { node, text: run, lines, meta, tokens: 0 };
    scrollDown(true);
  }

  function appendToken(data) {
    const stick = nearBottom();
    if (reply.tokens === 0) reply.meta.textContent = "streaming…";
    reply.tokens += 1;
    if (reply.lines) {
      const line = document.createElement("li");
      line.textContent = data;
      reply.lines.append(line);
    } else {
      reply.text.appendData(data);
    }
    scrollDown(stick);
  }

  function finishReply(status, stats, why) {
    const { node, meta } = reply;
    reply = null;
    stopping = false;
    node.classList.remove("streaming");
    node.classList.add(status);
    node.dataset.status = status;
    node.setAttribute("aria-busy", "false");
    const parts = [];
    if (status === "interrupted") parts.push("interrupted");
    if (status === "incomplete") parts.push("incomplete");
    if (why) parts.push(why);
    meta.textContent = [...parts, ...describeStats(stats)].join(" · ");
    updateControls();
  }

  function describeStats(stats) {
    if (!stats) return [];
    const parts = [];
    if (stats.tokens_generated != null) parts.push(`${stats.tokens_generated} tokens`);
    if (stats.time_to_first_token_ms != null) {
      parts.push(`first token ${Math.round(stats.time_to_first_token_ms)} ms`);
    }
    if (stats.time_to_first_chunk_ms != null) {
      parts.push(`first piece ${Math.round(stats.time_to_first_chunk_ms)} ms`);
    }
    if (stats.tokens_per_second != null) {
      parts.push(`${Number(stats.tokens_per_second).toFixed(1)} tokens/s`);
    }
    return parts;
  }

  function describeConfig(config) {
    const parts = [`temperature ${config.temperature}`, `max tokens ${config.max_tokens}`];
    parts.push(config.system_prompt ? "system prompt set" : "no system prompt");
    const chunking = config.chunking || "none";
    if (chunking !== "none") parts.push(`voice view: ${chunking}s`);
    return parts.join(" · ");
  }

  function nearBottom() {
    const t = el.transcript;
    return t.scrollHeight - t.scrollTop - t.clientHeight < 80;
  }

  function scrollDown(yes) {
    if (yes) el.transcript.scrollTop = el.transcript.scrollHeight;
  }

  // ---- user actions --------------------------------------------------------------------

  function submitMessage() {
    const text = el.input.value;
    if (!text.trim() || !connected || reply) return;
    startReply(text);
    send({ type: "user_message", text });
    el.input.value = "";
    updateControls();
    el.input.focus();
  }

  function stopReply() {
    if (!reply || stopping) return;
    stopping = true;
    send({ type: "cancel" });
    updateControls();
  }

  function applySettings() {
    const config = {};
    const prompt = el.systemPrompt.value.trim();
    if (prompt) config.system_prompt = prompt;
    if (el.temperature.value !== "") config.temperature = Number(el.temperature.value);
    if (el.maxTokens.value !== "") config.max_tokens = Number(el.maxTokens.value);
    config.chunking = el.chunking.value;
    applied = config;
    if (el.apiKey.value.trim() !== usedKey || !connected) {
      reconnect(); // session_started sends the config
    } else {
      send({ type: "start_session", config });
    }
  }

  function updateControls() {
    const busy = reply !== null;
    el.send.disabled = !connected || busy || !el.input.value.trim();
    el.stop.disabled = !busy || stopping;
    el.stop.textContent = stopping ? "Stopping…" : "Stop";
    el.apply.disabled = busy;
  }

  // ---- /health: which engine and model serve -------------------------------------------

  async function loadHealth() {
    try {
      // A 503 still carries the JSON body that says why.
      const response = await fetch("health", { cache: "no-store" });
      const body = await response.json();
      el.engine.textContent = `${body.backend || "engine"} · ${body.model || "unknown model"}`;
      el.health.dataset.status = body.status || "unknown";
      el.healthStatus.textContent = body.status || "unknown";
    } catch {
      el.health.dataset.status = "unreachable";
      el.healthStatus.textContent = "unreachable";
    }
  }

  // ---- wiring --------------------------------------------------------------------------

  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    submitMessage();
  });
  el.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitMessage();
    }
  });
  el.input.addEventListener("input", updateControls);
  el.stop.addEventListener("click", stopReply);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && reply) {
      event.preventDefault();
      stopReply();
    }
  });
  el.reconnect.addEventListener("click", reconnect);
  el.settings.addEventListener("submit", (event) => {
    event.preventDefault();
    applySettings();
  });

  el.apiKey.value = sessionStorage.getItem(KEY_STORE) || "";
  updateControls();
  connect();
  el.input.focus();
})();
