// glm5 chat page: streams /v1/chat/completions, keeps conversations in localStorage. No build step, no libraries.
// Model text is only ever set with textContent (never parsed as HTML).
"use strict";

const STORE_KEY = "glm5.conversations";
const SETTINGS_KEY = "glm5.settings";
const $ = (id) => document.getElementById(id);
const state = { conversations: [], current: null, controller: null };

// ---- storage -------------------------------------------------------------------------------------------
function load() {
  try { state.conversations = JSON.parse(localStorage.getItem(STORE_KEY)) || []; } catch { state.conversations = []; }
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY)) || {};
    for (const [key, value] of Object.entries(saved)) {
      const el = $(key);
      if (!el) continue;
      if (el.type === "checkbox") el.checked = value; else el.value = value;
    }
  } catch { /* defaults */ }
}
function save() { localStorage.setItem(STORE_KEY, JSON.stringify(state.conversations)); }
function saveSettings() {
  const out = {};
  for (const key of ["temperature", "top_p", "max_tokens", "thinking", "system", "tools", "model"]) {
    const el = $(key);
    out[key] = el.type === "checkbox" ? el.checked : el.value;
  }
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(out));
}
function conversation() { return state.conversations.find((c) => c.id === state.current); }
function newConversation() {
  const conv = { id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`, title: "New chat",
                 created: new Date().toISOString(), messages: [] };
  state.conversations.unshift(conv);
  state.current = conv.id;
  save();
  render();
  $("input").focus();
}

// ---- rendering -----------------------------------------------------------------------------------------
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}
function renderList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of state.conversations) {
    const item = el("li");
    const button = el("button", "", conv.title);
    button.title = conv.title;
    if (conv.id === state.current) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => { if (!state.controller) { state.current = conv.id; render(); } });
    item.append(button);
    list.append(item);
  }
}
function messageView(message) {
  const view = el("article", `message ${message.role}`);
  view.append(el("div", "role", message.role === "user" ? "You" : "glm5"));
  const reasoning = el("details", "reasoning");
  reasoning.append(el("summary", "", "Reasoning"), el("div", "reasoning-text", message.reasoning || ""));
  reasoning.hidden = !message.reasoning;
  const calls = el("div", "tool-calls");
  // in the order GLM-5 writes them: reasoning, the answer, then its tool calls
  view.append(reasoning, el("div", "content", message.content || ""), calls, el("div", "status", message.status || ""));
  for (const call of message.tool_calls || []) calls.append(toolCallView(call));
  return view;
}
function toolCallView(call) {
  const box = el("div", "tool-call");
  box.append(el("span", "", "tool call "), el("span", "tool-name", call.function.name), el("pre", "", call.function.arguments));
  return box;
}
function render() {
  renderList();
  const conv = conversation();
  const box = $("messages");
  box.replaceChildren();
  if (!conv || !conv.messages.length) {
    box.append(el("div", "empty", "Ask glm5 anything. Enter sends, Esc stops, Alt+N starts a new chat."));
    return;
  }
  for (const message of conv.messages) box.append(messageView(message));
  box.scrollTop = box.scrollHeight;
}
function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

// ---- talking to the server ----------------------------------------------------------------------------
async function loadModels() {
  try {
    const response = await fetch("/v1/models");
    const body = await response.json();
    const select = $("model");
    const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}").model;
    select.replaceChildren(...body.data.map((m) => { const o = el("option", "", m.id); o.value = m.id; return o; }));
    if (saved && body.data.some((m) => m.id === saved)) select.value = saved;
    $("model-label").textContent = `— ${select.value}`;
  } catch (err) { showError(`cannot list models: ${err}`); }
}
function requestMessages(conv) {
  const out = [];
  const system = $("system").value.trim();
  if (system) out.push({ role: "system", content: system });
  for (const m of conv.messages) {
    if (m.role === "user") { out.push({ role: "user", content: m.content }); continue; }
    const turn = { role: "assistant", content: m.content || "" };
    if (m.reasoning) turn.reasoning_content = m.reasoning;
    if (m.tool_calls && m.tool_calls.length) turn.tool_calls = m.tool_calls;
    out.push(turn);
  }
  return out;
}
function requestBody(conv) {
  const body = {
    model: $("model").value, messages: requestMessages(conv), stream: true,
    temperature: Number($("temperature").value), top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
    chat_template_kwargs: { enable_thinking: $("thinking").checked },
  };
  const tools = $("tools").value.trim();
  if (tools) body.tools = JSON.parse(tools);  // a SyntaxError is shown to the user
  return body;
}
function setBusy(busy) {
  $("stop").disabled = !busy;
  $("send").disabled = busy;
}

async function send(text) {
  let conv = conversation();
  if (!conv) { newConversation(); conv = conversation(); }
  let body;
  conv.messages.push({ role: "user", content: text });
  try { body = requestBody(conv); } catch (err) { conv.messages.pop(); showError(`tools: ${err.message}`); return; }
  showError("");
  if (conv.title === "New chat") conv.title = text.slice(0, 40);
  const reply = { role: "assistant", content: "", reasoning: "", tool_calls: [], status: "streaming…" };
  conv.messages.push(reply);
  save();
  render();
  const view = $("messages").lastElementChild;
  view.classList.add("streaming");
  const parts = { reasoning: view.querySelector(".reasoning"), reasoningText: view.querySelector(".reasoning-text"),
                  calls: view.querySelector(".tool-calls"), content: view.querySelector(".content"),
                  status: view.querySelector(".status") };
  const callViews = [];
  state.controller = new AbortController();
  setBusy(true);
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
      signal: state.controller.signal });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          const delta = choice.delta || {};
          if (delta.reasoning_content) {
            reply.reasoning += delta.reasoning_content;
            parts.reasoning.hidden = false;
            parts.reasoningText.textContent = reply.reasoning;
          }
          if (delta.content) {
            reply.content += delta.content;
            parts.content.textContent = reply.content;
          }
          for (const call of delta.tool_calls || []) {
            if (!reply.tool_calls[call.index]) {
              reply.tool_calls[call.index] = { id: call.id, type: "function",
                                               function: { name: call.function.name || "", arguments: "" } };
              callViews[call.index] = toolCallView(reply.tool_calls[call.index]);
              parts.calls.append(callViews[call.index]);
            }
            const target = reply.tool_calls[call.index];
            target.function.arguments += (call.function && call.function.arguments) || "";
            callViews[call.index].querySelector("pre").textContent = target.function.arguments;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    }
    reply.status = finish === "length" ? "stopped: max tokens" : (finish === "tool_calls" ? "tool call" : "");
  } catch (err) {
    if (err.name === "AbortError") reply.status = "stopped";
    else { reply.status = "error"; showError(err.message); }
  } finally {
    reply.tool_calls = reply.tool_calls.filter(Boolean);
    state.controller = null;
    setBusy(false);
    view.classList.remove("streaming");
    parts.status.textContent = reply.status;
    save();
    renderList();
    $("input").focus();
  }
}
function stop() { if (state.controller) state.controller.abort(); }

function exportConversation() {
  const conv = conversation();
  if (!conv) return;
  const blob = new Blob([JSON.stringify(conv, null, 2)], { type: "application/json" });
  const link = el("a");
  link.href = URL.createObjectURL(blob);
  link.download = `glm5-chat-${conv.id}.json`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}
function deleteConversation() {
  if (state.controller) return;
  state.conversations = state.conversations.filter((c) => c.id !== state.current);
  state.current = state.conversations.length ? state.conversations[0].id : null;
  save();
  render();
}

// ---- wiring --------------------------------------------------------------------------------------------
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.controller) { event.preventDefault(); stop(); }
  if (event.altKey && (event.key === "n" || event.key === "N")) { event.preventDefault(); if (!state.controller) newConversation(); }
  if (event.altKey && (event.key === "e" || event.key === "E")) { event.preventDefault(); exportConversation(); }
});
$("stop").addEventListener("click", stop);
$("new-chat").addEventListener("click", () => { if (!state.controller) newConversation(); });
$("export").addEventListener("click", exportConversation);
$("delete-chat").addEventListener("click", deleteConversation);
for (const key of ["temperature", "top_p", "max_tokens", "thinking", "system", "tools", "model"]) {
  $(key).addEventListener("change", () => { saveSettings(); $("model-label").textContent = `— ${$("model").value}`; });
}

load();
state.current = state.conversations.length ? state.conversations[0].id : null;
render();
loadModels();
$("input").focus();
