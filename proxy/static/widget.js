/* wattgate widget: the energy of every chat reply, for any front end that calls a wattgate gateway.
 *
 *   <script src="http://GATEWAY/widget.js"></script>
 *
 * It watches the page's fetch calls to the gateway's /v1/chat/completions and /v1/completions (streamed
 * or not), reads the `energy` object the gateway adds (last stream chunk, or the JSON body), follows
 * GET /v1/energy/{id} until the figure is settled, and shows a badge per reply and the conversation's
 * total with everyday equivalents. Options, as data- attributes of the script tag:
 *   data-api="https://host/v1"   the API base the app calls (default: the gateway this file came from)
 *   data-panel="off"             no floating panel (use the events and WattGate.badge/total instead)
 * Events on window: "wattgate:reply" (detail: the reply) when a reply ends, "wattgate:update" when its
 * figure changes (settled); an app that wants the badge beside its own message element appends
 * WattGate.badge(event.detail) there. Figures and labels are always set as text, never parsed as HTML.
 */
(() => {
  "use strict";
  if (window.WattGate) return; // loaded twice

  const EQUIVALENTS = /*EQUIVALENTS*/[];
  const script = document.currentScript;
  const options = script ? script.dataset : {};
  const origin = script ? new URL(script.src, location.href).origin : location.origin;
  const apiBase = new URL(options.api || `${origin}/v1`, location.href).href.replace(/\/+$/, "");
  const nativeFetch = window.fetch.bind(window);
  const replies = [];
  const listeners = new Set(); // elements to redraw when a reply comes or changes

  const METHODS = { nvml: "measured", estimate: "estimate", simulated: "simulated" };
  const number = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 3 });
  const fmt = (x) => (x === 0 ? "0" : Math.abs(x) < 1e-3 ? x.toExponential(2) : number.format(x));

  /** The figures of one energy object (or several summed), as text. */
  function describe(e) {
    return {
      energy: e.joules >= 3600 ? `${fmt(e.wh)} Wh` : `${fmt(e.joules)} J (${fmt(e.wh)} Wh)`,
      carbon: `${fmt(e.gco2e)} gCO2e`,
      water: `${fmt(e.water_ml)} mL water`,
      tokens: `${e.completion_tokens ?? 0} tokens`,
    };
  }

  function duration(hours) {
    for (const [unit, perHour] of [["hours", 1], ["minutes", 60], ["seconds", 3600]]) {
      if (hours * perHour >= 1 || unit === "seconds") return `${number.format(hours * perHour)} ${unit}`;
    }
  }

  /** One everyday equivalent of totals {wh, gco2e, water_ml}: the same wording as `wattgate report`. */
  function equivalent(entry, totals) {
    const value = totals[entry.figure];
    if (entry.kind === "duration") return `${entry.what} for ${duration(value / entry.watts)}`;
    if (entry.kind === "distance") {
      const km = value / entry.g_per_km;
      return `${entry.what} driven ${km >= 1 ? `${number.format(km)} km` : `${number.format(km * 1000)} m`}`;
    }
    const n = value / entry.per_unit;
    return n >= 1 ? `${number.format(n)} ${entry.unit}` : `${number.format(n * 100)} % of ${entry.one}`;
  }

  function totals() {
    const sum = { joules: 0, wh: 0, gco2e: 0, water_ml: 0, completion_tokens: 0 };
    for (const r of replies) for (const k in sum) sum[k] += r.energy[k] || 0;
    return sum;
  }

  function changed(reply, event) {
    for (const el of listeners) el.render();
    window.dispatchEvent(new CustomEvent(event, { detail: reply }));
  }

  // ---- reading what the gateway sends -------------------------------------------------------------

  /** Calls onData(text) for each `data:` payload of a server-sent-event stream. */
  async function readEvents(body, onData) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    const line = (text) => {
      if (text === "") {
        if (data.length) onData(data.join("\n"));
        data = [];
      } else if (text.startsWith("data:")) {
        data.push(text.slice(text[5] === " " ? 6 : 5));
      }
    };
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = done ? "" : lines.pop();
      for (const text of lines) line(text);
      if (done) return line("");
    }
  }

  function energyOf(payload) {
    try {
      const obj = JSON.parse(payload);
      return obj && typeof obj.energy === "object" ? obj.energy : null;
    } catch {
      return null; // [DONE], or not JSON
    }
  }

  function watched(url, init) {
    const method = (init && init.method) || "GET";
    return method.toUpperCase() === "POST" && url.startsWith(apiBase) && /\/(chat\/)?completions$/.test(url.split("?")[0]);
  }

  function requestFacts(input, init) {
    const headers = new Headers((init && init.headers) || (input instanceof Request ? input.headers : undefined));
    let model = null;
    if (init && typeof init.body === "string") {
      try { model = JSON.parse(init.body).model; } catch { /* not JSON: the gateway will say so */ }
    }
    return { authorization: headers.get("authorization"), model };
  }

  async function observe(response, facts) {
    let energy = null;
    if ((response.headers.get("content-type") || "").includes("text/event-stream")) {
      await readEvents(response.body, (payload) => { energy = energyOf(payload) || energy; });
    } else {
      energy = (await response.json()).energy || null;
    }
    if (energy) add(energy, facts);
  }

  /** fetch, watching calls to the gateway's completions: the app's response is untouched (a clone is read). */
  async function meteredFetch(input, init) {
    const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
    const response = await nativeFetch(input, init);
    if (response.ok && watched(new URL(url, location.href).href, init || (input instanceof Request ? input : null))) {
      const facts = requestFacts(input, init);
      const id = response.headers.get("x-request-id");
      // Stopped before its figure came (the app aborted): the gateway still records what it used.
      observe(response.clone(), facts).catch(() => id && recorded(id, facts));
    }
    return response;
  }

  /** The gateway's record of `id`, once it has one that `wanted` accepts (null if it never does). */
  async function poll(id, authorization, wanted) {
    const headers = authorization ? { authorization } : {};
    for (const wait of [300, 700, 1000, 2000, 4000, 8000, 15000]) {
      await new Promise((resolve) => setTimeout(resolve, wait));
      try {
        const r = await nativeFetch(`${apiBase}/energy/${encodeURIComponent(id)}`, { headers });
        if (r.status === 401 || r.status === 403) return null;
        const record = r.ok ? await r.json() : null;
        if (record && wanted(record)) return record;
      } catch { /* the gateway restarting: try again */ }
    }
    return null;
  }

  async function recorded(id, facts) {
    const record = await poll(id, facts.authorization, () => true);
    if (record) add(record, facts);
  }

  function add(energy, facts) {
    const reply = { energy, model: facts.model, authorization: facts.authorization };
    replies.push(reply);
    changed(reply, "wattgate:reply");
    if (!energy.settled) settle(reply);
    return reply;
  }

  /** Follows GET /v1/energy/{id} until the record is settled (about a second, more under load), or the
   * gateway says it will never be (its ledger could not store it: `stored: false`). */
  async function settle(reply) {
    const record = await poll(reply.energy.request_id, reply.authorization, (r) => r.settled || r.stored === false);
    if (record && replies.includes(reply)) {
      reply.energy = { ...reply.energy, ...record };
      changed(reply, "wattgate:update");
    }
  }

  // ---- what the page shows ------------------------------------------------------------------------

  const CSS = `
    :host { font: 0.8125rem/1.4 system-ui, sans-serif; color: #1f2328; }
    .badge { display: flex; flex-wrap: wrap; gap: 0.25rem 0.75rem; margin-top: 0.25rem; color: #3d444d; }
    .badge .method, .badge .state { font-weight: 600; }
    .badge .state.provisional { color: #7d4e00; }
    .badge .state.settled { color: #116329; }
    .badge .state.not-stored { color: #a40e26; }
    .total h2 { font-size: 0.9375rem; margin: 0 0 0.25rem; }
    .total ul { margin: 0.25rem 0 0; padding-left: 1.1rem; }
    .total .basis { color: #59636e; font-size: 0.75rem; }
    .panel { position: fixed; right: 1rem; bottom: 1rem; max-width: min(24rem, calc(100vw - 2rem));
             max-height: 60vh; overflow: auto; background: #fff; border: 1px solid #d1d9e0;
             border-radius: 0.5rem; padding: 0.5rem 0.75rem; box-shadow: 0 4px 16px rgb(0 0 0 / 0.15); }
    .panel summary { cursor: pointer; font-weight: 600; }
    .panel ol { padding-left: 1.25rem; }
    button { font: inherit; margin-top: 0.5rem; }
  `;
  let sheet = null;
  function shadow(el) {
    const root = el.attachShadow({ mode: "open" });
    if (!sheet) { sheet = new CSSStyleSheet(); sheet.replaceSync(CSS); } // not an inline style: CSP allows it
    root.adoptedStyleSheets = [sheet];
    return root;
  }
  const node = (tag, text, cls) => {
    const el = document.createElement(tag);
    if (text !== undefined) el.textContent = text;
    if (cls) el.className = cls;
    return el;
  };

  /** <wattgate-badge>: one reply's figures, method and whether they are settled. */
  class Badge extends HTMLElement {
    connectedCallback() { listeners.add(this); this.render(); }
    disconnectedCallback() { listeners.delete(this); }
    render() {
      const e = this.reply && this.reply.energy;
      if (!e) return;
      const root = this.shadowRoot || shadow(this);
      const d = describe(e);
      const state = e.settled ? "settled" : e.stored === false ? "not stored" : "provisional";
      const box = node("div", undefined, "badge");
      box.setAttribute("role", "group");
      box.setAttribute("aria-label", "Energy of this reply");
      for (const [text, cls] of [[d.energy, "energy"], [d.carbon, "carbon"], [d.water, "water"], [d.tokens, "tokens"],
                                 [METHODS[e.method] || e.method, "method"], [state, `state ${state.replace(" ", "-")}`]]) {
        box.append(node("span", text, cls));
      }
      if (e.status === "client_closed") box.append(node("span", "stopped", "status"));
      if (e.method === "estimate") box.title = "estimated: the gateway could not measure this reply's GPU";
      root.replaceChildren(box);
      Object.assign(this.dataset, { requestId: e.request_id, joules: e.joules, wh: e.wh, gco2e: e.gco2e,
                                    waterMl: e.water_ml, method: e.method, settled: e.settled });
    }
  }

  /** <wattgate-total>: the conversation's total and its everyday equivalents, each with its basis. */
  class Total extends HTMLElement {
    connectedCallback() { listeners.add(this); this.render(); }
    disconnectedCallback() { listeners.delete(this); }
    render() {
      const root = this.shadowRoot || shadow(this);
      const sum = totals();
      const box = node("section", undefined, "total");
      box.setAttribute("aria-label", "Energy of this conversation");
      box.append(node("h2", `This conversation: ${replies.length} ${replies.length === 1 ? "reply" : "replies"}`));
      const d = describe(sum);
      box.append(node("div", `${d.energy} · ${d.carbon} · ${d.water} · ${d.tokens}`, "sum"));
      if (replies.some((r) => !r.energy.settled)) box.append(node("div", "some figures are still provisional", "basis"));
      const list = node("ul");
      for (const entry of EQUIVALENTS) {
        const item = node("li", `about ${equivalent(entry, sum)} `);
        item.append(node("span", `(${entry.basis})`, "basis"));
        list.append(item);
      }
      box.append(list);
      Object.assign(this.dataset, { joules: sum.joules, replies: replies.length });
      root.replaceChildren(box);
    }
  }

  /** <wattgate-panel>: a corner panel with the total and every reply's badge (the default for other apps). */
  class Panel extends HTMLElement {
    connectedCallback() {
      const root = shadow(this);
      const box = node("details", undefined, "panel");
      box.open = true;
      const summary = node("summary", "Energy of this chat (wattgate)");
      this.list = node("ol");
      const reset = node("button", "New conversation");
      reset.type = "button";
      reset.addEventListener("click", () => WattGate.reset());
      box.append(summary, document.createElement("wattgate-total"), this.list, reset);
      root.replaceChildren(box);
      listeners.add(this);
      this.render();
    }
    disconnectedCallback() { listeners.delete(this); }
    render() {
      if (!this.list) return;
      const shown = new Set([...this.list.children].map((li) => li.firstChild.reply));
      for (const reply of replies) {
        if (shown.has(reply)) continue;
        const item = node("li");
        item.append(badge(reply));
        this.list.append(item);
      }
      for (const li of [...this.list.children]) if (!replies.includes(li.firstChild.reply)) li.remove();
    }
  }

  function badge(reply) {
    const el = document.createElement("wattgate-badge");
    el.reply = reply;
    return el;
  }

  customElements.define("wattgate-badge", Badge);
  customElements.define("wattgate-total", Total);
  customElements.define("wattgate-panel", Panel);

  const WattGate = {
    /** fetch that records the gateway's figures: for clients holding a fetch of their own (OpenAI's SDK). */
    fetch: meteredFetch,
    /** The replies of this conversation so far: {energy, model, authorization}. */
    replies,
    /** An element showing one reply's badge (it follows the reply to its settled figure). */
    badge,
    /** Record an energy object the app read itself (e.g. from a WebSocket relay). */
    add: (energy, model = null) => add(energy, { model, authorization: null }),
    /** Start a new conversation: the total starts again from zero. */
    reset() { replies.length = 0; for (const el of listeners) el.render(); },
    /** Calls a function with each `data:` payload of a server-sent-event stream (a fetch body). */
    readEvents,
    /** A number to three significant figures, as the badges show it. */
    format: fmt,
    /** One everyday equivalent of totals {wh, gco2e, water_ml}, worded as `wattgate report` words it. */
    equivalent,
    equivalents: EQUIVALENTS,
    apiBase,
  };
  window.WattGate = WattGate;
  window.fetch = meteredFetch;
  if (options.panel !== "off") {
    const mount = () => document.body.append(document.createElement("wattgate-panel"));
    if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);
  }
})();
