/* wattgate's chat page: a streaming chat with any registry model, the widget's badge under each reply and
 * its total below the conversation. User and model text is always set as text, never as HTML. */
"use strict";

const KEY = "wattgate-key"; // session storage: this tab only
const $ = (id) => document.getElementById(id);
const turns = []; // the conversation sent with each message
const replyElements = new Map(); // request id -> the reply's element, for its badge
let energyPerModel = {};
let running = null; // the AbortController of the reply being streamed

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, authorization: `Bearer ${key}` } : extra;
}

async function errorText(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function askForKey(message) {
  sessionStorage.removeItem(KEY);
  $("chat").hidden = true;
  $("key-form").hidden = false;
  showError(message || "");
  $("key").focus();
}

async function start() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) return askForKey(sessionStorage.getItem(KEY) ? "That key was refused." : "");
  if (!response.ok) return showError(await errorText(response));
  $("key-form").hidden = true;
  $("chat").hidden = false;
  $("forget-key").hidden = !sessionStorage.getItem(KEY);
  const select = $("model");
  select.replaceChildren();
  for (const model of (await response.json()).data) {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    select.append(option);
  }
  await loadModelEnergy();
  $("message").focus();
}

/** Each model's energy per 1,000 output tokens over the last 30 days of this team's settled records. */
async function loadModelEnergy() {
  const response = await fetch("/v1/energy?by=model&since=30d", { headers: headers() });
  if (!response.ok) return;
  energyPerModel = Object.fromEntries((await response.json()).data.map((row) => [row.model, row]));
  for (const option of $("model").options) {
    const row = energyPerModel[option.value];
    option.textContent = row && row.joules_per_token
      ? `${option.value} · ${WattGate.format(row.joules_per_token * 1000)} J per 1,000 tokens`
      : option.value;
  }
  describeModel();
}

function describeModel() {
  const name = $("model").value;
  const row = energyPerModel[name];
  if (!row || !row.joules_per_token) {
    $("model-energy").textContent = `No settled replies of ${name} yet: its energy per token shows here once there are.`;
    return;
  }
  const perK = row.joules_per_token * 1000;
  let text = `${name}: ${WattGate.format(perK)} J (${WattGate.format(perK / 3600)} Wh) per 1,000 output tokens, ` +
    `over ${row.requests} settled ${row.requests === 1 ? "reply" : "replies"} in 30 days (${row.methods}).`;
  const others = Object.values(energyPerModel).filter((r) => r.model !== name && r.joules_per_token);
  const cheapest = others.sort((a, b) => a.joules_per_token - b.joules_per_token)[0];
  if (cheapest && cheapest.joules_per_token < row.joules_per_token) {
    const saved = 1 - cheapest.joules_per_token / row.joules_per_token;
    text += ` ${cheapest.model} used ${Math.round(saved * 100)} % less per token.`;
  }
  $("model-energy").textContent = text;
}

/** Whether the reader is at the end of the page (not scrolled up to read back). */
function atEnd() {
  const page = document.scrollingElement;
  return page.scrollTop + page.clientHeight >= page.scrollHeight - 48;
}

/** Apply ``change`` to the conversation; a reader who was at the end (or ``always``: who just sent)
 * stays there, so the newest reply is in view above the composer; one who scrolled up is left there. */
function follow(change, always = false) {
  const stay = always || atEnd();
  change();
  if (stay) document.scrollingElement.scrollTop = document.scrollingElement.scrollHeight;
}

function message(role, text, always = false) {
  const el = document.createElement("div");
  el.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : $("model").value;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  el.append(who, body);
  follow(() => $("log").append(el), always);
  return body;
}

async function send(text) {
  showError("");
  turns.push({ role: "user", content: text });
  message("user", text, true);
  const out = message("assistant", "");
  running = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let reply = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "content-type": "application/json" }),
      body: JSON.stringify({ model: $("model").value, messages: turns, stream: true }),
      signal: running.signal,
    });
    if (response.status === 401) return askForKey("The gateway refused the key.");
    if (!response.ok) throw new Error(await errorText(response));
    replyElements.set(response.headers.get("x-request-id"), out.parentElement);
    await WattGate.readEvents(response.body, (payload) => {
      if (payload === "[DONE]") return;
      const chunk = JSON.parse(payload);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        reply += delta.content;
        follow(() => { out.textContent = reply; });
      }
    });
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  } finally {
    turns.push({ role: "assistant", content: reply });
    running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

window.addEventListener("wattgate:reply", (event) => {
  const el = replyElements.get(event.detail.energy.request_id);
  if (el) follow(() => el.append(WattGate.badge(event.detail)));
});
window.addEventListener("wattgate:update", () => loadModelEnergy());

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || running) return;
  $("message").value = "";
  send(text);
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
$("stop").addEventListener("click", () => running && running.abort());
$("new").addEventListener("click", () => {
  if (running) running.abort();
  turns.length = 0;
  replyElements.clear();
  $("log").replaceChildren();
  WattGate.reset();
  $("message").focus();
});
$("model").addEventListener("change", describeModel);
$("forget-key").addEventListener("click", () => askForKey(""));
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  start();
});

start().catch((err) => showError(`Could not reach the gateway: ${err.message}`));
