// lln-serve playground: chat and raw completion over this server's own OpenAI API (SSE),
// with live figures and a chart of the conversation's constant state next to the KV cache a
// softmax model of the same shape would hold. No build step, no external resources.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "lln-serve-api-key";

const app = {
  model: null,
  info: null, // GET /v1/state_info: state bytes, KV bytes per token, load
  history: [], // chat messages kept in the conversation (sent again when sessions are off)
  pendingCalls: [], // tool calls of the last answer: the next messages are their results
  sessionId: null,
  turns: [], // chart points: {tokens, state, kv}
  running: null, // AbortController of the answer being streamed
  authorized: false,
  needsKey: false, // the server answered 401: wait for a key before asking again
  contextName: null, // the file the long context came from (null: pasted)
  prefillShown: false, // this answer's prefill takes several engine steps: its bar is shown
};

// ---- HTTP -----------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) {
    // not JSON: the status says enough
  }
  return `${response.status} ${response.statusText}`;
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

// ---- server status, model and state facts ---------------------------------------------------------

async function pollHealth() {
  let status = "error";
  try {
    const response = await fetch("/health");
    status = response.ok ? "ok" : (await response.json()).status || "error";
  } catch (_) {
    status = "unreachable";
  }
  const badge = $("health");
  badge.dataset.status = status === "ok" ? "ok" : status === "loading" ? "loading" : "error";
  badge.textContent = status === "ok" ? "ready" : status;
  if (status === "ok" && !app.authorized && !app.needsKey) await connect();
  else if (status === "ok" && app.authorized && !app.running) {
    await refreshInfo().catch(() => {});
    if (!app.turns.length) showConversation();
  }
  setTimeout(pollHealth, status === "ok" ? 5000 : 1000);
}

async function connect() {
  try {
    const models = await getJSON("/v1/models");
    app.model = models.data[0].id;
    app.authorized = true;
    $("model-name").textContent = app.model;
    await refreshInfo();
    showConversation();
  } catch (error) {
    app.authorized = false;
    app.needsKey = error.message.startsWith("401"); // retried when the key changes
    $("model-name").textContent = app.needsKey
      ? "API key required: type it on the left"
      : `cannot list models: ${error.message}`;
  }
}

async function refreshInfo(sessionId) {
  const query = sessionId ? `?session_id=${encodeURIComponent(sessionId)}` : "";
  const info = await getJSON(`/v1/state_info${query}`);
  app.info = info;
  $("running").textContent = info.num_requests_running;
  $("slots").textContent = `${info.state_slots_used} / ${info.state_slots_allocated}`;
  return info;
}

// ---- the request body -------------------------------------------------------------------------

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function numberField(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function stopStrings() {
  return $("stop").value.split("\n").filter((s) => s !== "").map((s) => s.replaceAll("\\n", "\n"));
}

function sampling() {
  // return_progress: the server streams prefill progress (llama.cpp's prompt_progress)
  const body = { stream: true, stream_options: { include_usage: true }, return_progress: true };
  for (const id of ["temperature", "top_p", "top_k", "max_tokens", "seed"]) {
    const value = numberField(id);
    if (value !== undefined) body[id] = value;
  }
  const stop = stopStrings();
  if (stop.length) body.stop = stop;
  if ($("session").checked) {
    app.sessionId = app.sessionId || newSessionId();
    body.session_id = app.sessionId;
  }
  return body;
}

function newSessionId() {
  // crypto.randomUUID needs a secure context; getRandomValues works over plain http too
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return `playground-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function toolFields() {
  // OpenAI's tools, tool_choice and parallel_tool_calls from the Tools box (none if empty)
  const text = $("tools").value.trim();
  if (!text) return {};
  let tools;
  try {
    tools = JSON.parse(text);
  } catch (error) {
    throw new Error(`Tools: not JSON (${error.message})`);
  }
  const parallel = $("parallel-calls").checked;
  return { tools, tool_choice: $("tool-choice").value, parallel_tool_calls: parallel };
}

function chatMessages(text) {
  // {added: what joins the conversation, send: what this request carries}
  // after a tool call, the message is its result
  const call = app.pendingCalls.shift();
  const user = call
    ? { role: "tool", tool_call_id: call.id, content: text }
    : { role: "user", content: text };
  const system = $("system").value.trim();
  const first = app.history.length === 0;
  const added = first && system ? [{ role: "system", content: system }, user] : [user];
  // a session's state already holds the conversation: send only what is new
  return { added, send: $("session").checked ? added : [...app.history, ...added] };
}

// ---- one answer -------------------------------------------------------------------------------

async function send(text) {
  if (!app.model) await connect();
  if (!app.model) {
    addMessage("error", `not sent: ${$("model-name").textContent}`);
    return;
  }
  const chat = mode() === "chat";
  let tools = {};
  try {
    tools = chat ? toolFields() : {};
  } catch (error) {
    addMessage("error", error.message);
    return;
  }
  const body = { model: app.model, ...sampling(), ...tools };
  const context = $("context-text").value;
  const content = context ? `${context}\n\n${text}` : text;
  const turn = chat ? chatMessages(content) : null;
  if (chat) {
    body.messages = turn.send;
  } else {
    body.prompt = content;
  }
  const userItem = addMessage(chat ? "user" : "user completion", text);
  if (context) meta(userItem, `after ${contextLabel()} (${context.length.toLocaleString("en")} characters)`);
  const answer = addMessage("assistant", "");
  const controller = new AbortController();
  setRunning(controller);
  const timing = { start: performance.now(), first: null, last: null, chunks: 0 };
  resetAnswerFigures();
  let result;
  try {
    const response = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    result = await readStream(response, answer, timing, chat);
  } catch (error) {
    finishFailed(error, answer, userItem, controller);
    return;
  } finally {
    setRunning(null);
  }
  if (chat) app.history.push(...turn.added, assistantTurn(result));
  app.pendingCalls = result.calls.slice();
  if (result.calls.length) meta(answer, `your next message is the result of ${result.calls[0].function.name}`);
  if (context) clearContext(); // it is in the conversation now (in the session's state)
  await recordTurn(result.usage, timing, answer).catch((error) => {
    meta(answer, `figures unavailable: ${error.message}`);
  });
}

async function readStream(response, answer, timing, chat) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const out = { text: "", usage: null, calls: [] };
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      handleEvent(event, out, answer, timing, chat);
    }
  }
  return out;
}

function handleEvent(event, out, answer, timing, chat) {
  for (const line of event.split("\n")) {
    if (!line.startsWith("data: ")) continue;
    const data = line.slice(6);
    if (data === "[DONE]") return;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(`${chunk.error.code}: ${chunk.error.message}`);
    if (chunk.usage) out.usage = chunk.usage;
    if (chunk.prompt_progress) showPrefill(chunk.prompt_progress);
    for (const choice of chunk.choices || []) {
      const piece = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
      if (chat && choice.delta && choice.delta.tool_calls) addCallPieces(out, choice.delta.tool_calls);
      const now = performance.now();
      if (timing.first === null) {
        timing.first = now;
        $("ttft").textContent = formatSeconds((now - timing.start) / 1000);
      }
      timing.last = now;
      timing.chunks += 1;
      out.text += piece;
      answer.firstChild.textContent = out.text + callsText(out.calls);
      showRate(timing, timing.chunks);
    }
  }
}

function addCallPieces(out, pieces) {
  // as the OpenAI SDK accumulates: id and name in a call's first piece, arguments in pieces
  for (const piece of pieces) {
    if (!out.calls[piece.index]) {
      out.calls[piece.index] = { id: piece.id, type: "function", function: { name: piece.function.name, arguments: "" } };
    }
    out.calls[piece.index].function.arguments += piece.function.arguments || "";
  }
}

function callsText(calls) {
  return calls.map((c) => `\n→ ${c.function.name}(${c.function.arguments})`).join("");
}

function assistantTurn(result) {
  if (!result.calls.length) return { role: "assistant", content: result.text };
  return { role: "assistant", content: result.text || null, tool_calls: result.calls };
}

function finishFailed(error, answer, userItem, controller) {
  const cancelled = controller.signal.aborted;
  answer.classList.add(cancelled ? "cancelled" : "error");
  userItem.classList.add("cancelled");
  const note = cancelled
    ? "stopped: the request was cancelled and its slot freed; this turn is not part of the conversation"
    : error.message;
  meta(answer, note);
  if (cancelled) setTimeout(() => refreshInfo().catch(() => {}), 300);
}

async function recordTurn(usage, timing, answer) {
  if (!usage) return;
  const cached = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
  $("generated").textContent = usage.completion_tokens;
  $("prefilled").textContent = usage.prompt_tokens - (app.sessionId ? 0 : cached);
  $("cached").textContent = cached;
  showRate(timing, usage.completion_tokens);
  let tokens, state, kv;
  if (app.sessionId) {
    // the saved session, as the server holds it
    const info = await refreshInfo(app.sessionId);
    ({ num_tokens: tokens, state_bytes: state, kv_cache_equivalent_bytes: kv } = info.session);
  } else {
    const info = await refreshInfo();
    tokens = usage.prompt_tokens + usage.completion_tokens;
    state = info.state_bytes_per_sequence;
    kv = tokens * info.kv_cache_bytes_per_token;
  }
  app.turns.push({ tokens, state, kv });
  meta(answer, `${usage.completion_tokens} tokens, ${$("tps").textContent} tok/s, ` +
    `TTFT ${$("ttft").textContent}, context ${tokens} tokens, cached ${cached}`);
  showConversation();
}

// ---- figures ----------------------------------------------------------------------------------

function resetAnswerFigures() {
  for (const id of ["ttft", "tps", "generated", "prefilled", "cached"]) $(id).textContent = "-";
  app.prefillShown = false;
  $("prefill").hidden = true;
}

function showPrefill(p) {
  // a prompt prefilled in one engine step needs no bar
  if (!app.prefillShown && p.processed >= p.total) return;
  app.prefillShown = true;
  $("prefill").hidden = false;
  const bar = $("prefill-bar");
  bar.max = p.total;
  bar.value = p.processed;
  const seconds = p.time_ms / 1000;
  const rate = seconds > 0 ? (p.processed - p.cache) / seconds : 0;
  const cached = p.cache ? `, ${p.cache.toLocaleString("en")} from the saved state` : "";
  const speed = rate > 0 ? ` · ${Math.round(rate).toLocaleString("en")} tok/s` : "";
  const percent = Math.floor((100 * p.processed) / p.total);
  let text = `prefill ${p.processed.toLocaleString("en")} / ${p.total.toLocaleString("en")} ` +
    `tokens (${percent}%${cached})${speed}`;
  if (p.processed >= p.total) text += ` · done in ${formatDuration(seconds)}`;
  else if (rate > 0) text += ` · ${formatDuration((p.total - p.processed) / rate)} left`;
  $("prefill-text").textContent = text;
}

function showRate(timing, tokens) {
  // decode speed after the first token, as llama.cpp reports it
  if (timing.first === null || tokens < 2 || timing.last <= timing.first) return;
  const seconds = (timing.last - timing.first) / 1000;
  $("tps").textContent = ((tokens - 1) / seconds).toFixed(1);
}

function showConversation() {
  const last = app.turns[app.turns.length - 1];
  $("context").textContent = last ? `${last.tokens} tokens` : "-";
  $("state-bytes").textContent = last ? formatBytes(last.state)
    : app.info ? formatBytes(app.info.state_bytes_per_sequence) : "-";
  $("kv-bytes").textContent = last ? formatBytes(last.kv) : "-";
  const info = app.info;
  if (info && last) {
    const tokens = Math.ceil(last.state / info.kv_cache_bytes_per_token);
    $("crossover").textContent = `A softmax KV cache passes this state at ${tokens.toLocaleString("en")} ` +
      `tokens and keeps growing (${formatBytes(info.kv_cache_bytes_per_token)} per token); the state stays ${formatBytes(last.state)}.`;
  } else {
    $("crossover").textContent = "";
  }
  drawChart($("chart"), app.turns);
}

function drawChart(svg, turns) {
  const ns = "http://www.w3.org/2000/svg";
  const W = 320, H = 200, left = 46, right = 10, top = 10, bottom = 28;
  svg.replaceChildren();
  const add = (name, attrs, text) => {
    const node = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.appendChild(node);
    return node;
  };
  add("line", { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, class: "axis" });
  add("line", { x1: left, y1: top, x2: left, y2: H - bottom, class: "axis" });
  svg.dataset.turns = turns.length;
  if (!turns.length) {
    add("text", { x: left + 8, y: H / 2 }, "send a message: one point per turn");
    return;
  }
  const maxX = Math.max(...turns.map((t) => t.tokens)) * 1.05;
  const maxY = Math.max(...turns.map((t) => Math.max(t.state, t.kv))) * 1.1;
  const x = (v) => left + (v / maxX) * (W - left - right);
  const y = (v) => H - bottom - (v / maxY) * (H - top - bottom);
  add("text", { x: 2, y: top + 8 }, formatBytes(maxY));
  add("text", { x: 2, y: H - bottom }, "0");
  add("text", { x: W - right, y: H - 8, "text-anchor": "end" }, `${Math.round(maxX)} tokens`);
  add("text", { x: left, y: H - 8 }, "context length");
  for (const series of ["state", "kv"]) {
    const points = [{ tokens: 0, [series]: series === "kv" ? 0 : turns[0].state }, ...turns];
    add("polyline", {
      class: series, points: points.map((t) => `${x(t.tokens)},${y(t[series])}`).join(" "),
    });
    turns.forEach((t, i) => {
      add("circle", {
        class: `point ${series}`, cx: x(t.tokens), cy: y(t[series]), r: 3,
        "data-series": series, "data-turn": i + 1, "data-tokens": t.tokens, "data-bytes": t[series],
      });
    });
  }
}

function formatBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i === 0 ? 0 : n < 10 ? 2 : 1)} ${units[i]}`;
}

function formatSeconds(s) {
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

function formatDuration(s) {
  if (s < 60) return formatSeconds(s);
  const minutes = Math.floor(s / 60);
  return `${minutes} min ${Math.round(s - 60 * minutes)} s`;
}

// ---- long context: a text file (picked or dropped) or pasted text, sent before the next message

function contextLabel() {
  return app.contextName ? `the context from ${app.contextName}` : "the pasted context";
}

function showContextStatus() {
  const length = $("context-text").value.length;
  $("context-status").textContent = length
    ? `${app.contextName || "pasted text"}: ${length.toLocaleString("en")} characters, sent ` +
      "before your next message (then the session holds it)"
    : "";
  $("context-clear").disabled = length === 0;
}

async function loadContext(file) {
  if (!file) return;
  $("context-text").value = await file.text();
  app.contextName = file.name;
  showContextStatus();
}

function clearContext() {
  $("context-text").value = "";
  $("context-file").value = "";
  app.contextName = null;
  showContextStatus();
}

function acceptDroppedFiles() {
  // a file dropped anywhere on the page becomes the context (not a navigation to it)
  const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
  window.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    document.body.classList.add("dragging");
  });
  window.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) document.body.classList.remove("dragging");
  });
  window.addEventListener("drop", (event) => {
    document.body.classList.remove("dragging");
    if (!hasFiles(event)) return;
    event.preventDefault();
    loadContext(event.dataTransfer.files[0]).catch((error) => {
      $("context-status").textContent = `cannot read that file: ${error.message}`;
    });
  });
}

// ---- the page ---------------------------------------------------------------------------------

function addMessage(kind, text) {
  const item = document.createElement("li");
  item.className = kind;
  item.appendChild(document.createTextNode(text));
  $("messages").appendChild(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function meta(item, text) {
  const span = document.createElement("span");
  span.className = "meta";
  span.textContent = text;
  item.appendChild(span);
}

function setRunning(controller) {
  app.running = controller;
  $("send").disabled = controller !== null;
  $("stop-button").disabled = controller === null;
}

function resetConversation() {
  if (app.running) app.running.abort();
  app.history = [];
  app.pendingCalls = [];
  app.sessionId = null;
  app.turns = [];
  $("messages").replaceChildren();
  resetAnswerFigures();
  showConversation();
}

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    const key = $("api-key").value.trim();
    // the key picks the tenant, and a session belongs to its tenant: another key starts over
    if (key !== (sessionStorage.getItem(KEY_STORE) || "")) resetConversation();
    sessionStorage.setItem(KEY_STORE, key);
    app.authorized = false;
    app.needsKey = false;
    connect();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value;
    if (!text.trim() || app.running) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop-button").addEventListener("click", () => app.running && app.running.abort());
  $("context-file").addEventListener("change", () => loadContext($("context-file").files[0]));
  $("context-text").addEventListener("input", () => {
    if (!$("context-text").value) app.contextName = null;
    showContextStatus();
  });
  $("context-clear").addEventListener("click", clearContext);
  acceptDroppedFiles();
  $("reset").addEventListener("click", resetConversation);
  $("session").addEventListener("change", resetConversation);
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      $("system-label").hidden = mode() !== "chat";
      $("tools-box").hidden = mode() !== "chat";
      resetConversation();
    });
  }
  showConversation();
  pollHealth();
}

init();
