// A front end on another origin: one streamed and one plain call to the gateway named in ?gateway=.
"use strict";
const gateway = new URLSearchParams(location.search).get("gateway");
const widget = document.createElement("script");
widget.src = `${gateway}/widget.js`; // what the app's own HTML would have as <script src=...>
widget.onload = run;
document.head.append(widget);

function line(text) {
  const p = document.createElement("p");
  p.textContent = text;
  document.getElementById("log").append(p);
  return p;
}

async function run() {
  const body = { model: "llama-3.1-8b", messages: [{ role: "user", content: "hi" }], max_tokens: 24 };
  const streamed = await fetch(`${gateway}/v1/chat/completions`, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ ...body, stream: true }),
  });
  const reader = streamed.body.getReader();
  const decoder = new TextDecoder();
  let raw = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    raw += decoder.decode(value, { stream: true });
  }
  line(`streamed reply: ${raw.split("\n\n").length} events`);
  const plain = await fetch(`${gateway}/v1/chat/completions`, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
  });
  line(`plain reply: ${(await plain.json()).choices[0].message.content.length} characters`);
  document.body.dataset.done = "true";
}
