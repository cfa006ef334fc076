// The chat demo served at `/`: a prompt box, the answer streaming in as it is generated, a
// progress bar with ETA, the connection state, Stop (cancels the generation), and a "watch in
// another tab" link that opens the same answer read-only (`/?watch=<id>&token=<read token>`)
// to show one generation broadcast to several readers. Everything goes through
// /static/streambroker.js, the browser client any page can use.
//
// Model output is untrusted: it only ever enters the page as text (one text node per answer
// that grows with appendData), never as markup; the page's CSP forbids inline script anyway.
//
// URL parameters: `watch` + `token` (watch-only mode), `heartbeat_ms` (the client's heartbeat
// timeout; the broker's default heartbeat is 15 s, so the client's default is 35 s).

import { States, createAndWatch, watch } from "/static/streambroker.js";

const KEY_STORAGE = "streambroker.demo.apiKey";
const PROMPT_METADATA_CHARS = 500; // the broker keeps metadata values up to 512 characters

const $ = (selector, scope = document) => scope.querySelector(selector);

/** Create an element with attributes and children (strings become text nodes). */
function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "dataset") Object.assign(element.dataset, value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  element.append(...children.filter((child) => child !== null && child !== undefined));
  return element;
}

function setText(element, text) {
  const value = String(text);
  if (element.textContent !== value) element.textContent = value;
}

/** 950 → "950 ms", 1500 → "1.5 s", 75000 → "1m 15s". */
function duration(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60_000)}m ${String(Math.floor((ms % 60_000) / 1000)).padStart(2, "0")}s`;
}

/** The watch options a page URL may set (for trying it out, and for the browser tests). */
function watchOptions(params) {
  const heartbeat = Number(params.get("heartbeat_ms"));
  return Number.isFinite(heartbeat) && heartbeat > 0 ? { heartbeatTimeoutMs: heartbeat } : {};
}

// ----------------------------------------------------------------------------- one turn

/** One exchange in the thread: the prompt, and the answer with its progress and links. */
class Turn {
  constructor(prompt) {
    this.started = performance.now();
    this.progress = null;
    this.renders = 0;
    this.text = document.createTextNode("");
    this.promptBubble = h("div", { class: "bubble" }, prompt ?? "");
    this.userRow = h("div", { class: "msg user", hidden: prompt === null }, this.promptBubble);
    this.answer = h("div", { class: "answer streaming", dataset: { role: "answer" }, tabindex: 0, "aria-label": "Answer" }, this.text);
    this.error = h("div", { class: "answer-error", dataset: { role: "answer-error" }, hidden: true });
    this.fill = h("div", { class: "fill" });
    this.bar = h("div", { class: "bar indeterminate", role: "progressbar", "aria-label": "Progress", "aria-valuemin": 0, "aria-valuemax": 100 }, this.fill);
    this.progressText = h("span", { dataset: { role: "progress-text" } }, "waiting for the model…");
    this.eta = h("span", { class: "eta", dataset: { role: "eta" } });
    this.stats = h("div", { class: "stats", dataset: { role: "stats" } });
    this.watchLink = h("a", { class: "watch-link", dataset: { role: "watch-link" }, target: "_blank", rel: "noopener", hidden: true }, "Watch in another tab ↗");
    this.outcome = h("span", { class: "outcome", dataset: { role: "outcome" } });
    this.element = h(
      "li",
      { class: "turn", dataset: { phase: "connecting" } },
      this.userRow,
      h(
        "div",
        { class: "msg assistant" },
        h(
          "div",
          { class: "bubble" },
          this.answer,
          this.error,
          h("div", { class: "meta" },
            h("div", { class: "progress" }, this.bar, h("div", { class: "progress-line" }, this.progressText, this.eta)),
            h("div", { class: "meta-line" }, this.outcome, this.watchLink, h("span", { class: "spacer" }), this.stats),
          ),
        ),
      ),
    );
  }

  setPrompt(prompt) {
    if (!prompt) return;
    setText(this.promptBubble, prompt);
    this.userRow.hidden = false;
  }

  setStream(streamId, token) {
    this.element.dataset.streamId = streamId;
    const query = new URLSearchParams({ watch: streamId });
    if (token) query.set("token", token); // auth off: no token, the id is enough
    this.watchLink.href = `/?${query}`;
    this.watchLink.hidden = false;
  }

  /** Tokens of one animation frame: one DOM update, the text exactly as it arrived. */
  append(text, stats) {
    this.text.appendData(text);
    this.renders += 1;
    this.element.dataset.phase = "streaming";
    this.renderProgress(stats);
    this.renderStats(stats);
  }

  showProgress(progress, event, stats) {
    this.progress = { ...progress, receivedAt: event.receivedAt };
    this.renderProgress(stats);
  }

  /** Progress events come every half second; between them the bar follows the tokens. */
  renderProgress(stats) {
    const progress = this.progress;
    if (!progress) return setText(this.progressText, `${stats.tokens} tokens`);
    const tokens = Math.max(progress.tokens || 0, stats.tokens);
    const total = progress.estimated_total;
    const share = total ? Math.min(100, (tokens / total) * 100) : null;
    this.bar.classList.toggle("indeterminate", share === null);
    if (share !== null) this.setBar(share);
    const rate = progress.tokens_per_second ? ` · ${progress.tokens_per_second.toFixed(0)} tok/s` : "";
    const of = total ? ` / ${total}` : "";
    const percent = share === null ? "" : `${share.toFixed(0)}% · `;
    setText(this.progressText, `${percent}${tokens}${of} tokens${rate}`);
    if (progress.eta_ms === null || progress.eta_ms === undefined) return setText(this.eta, "");
    const eta = Math.max(0, progress.eta_ms - (performance.now() - progress.receivedAt));
    setText(this.eta, `ETA ${duration(eta)}`);
  }

  setBar(share) {
    this.fill.style.width = `${share}%`; // CSSOM, not a style attribute: allowed by the CSP
    this.bar.setAttribute("aria-valuenow", String(Math.round(share)));
  }

  renderStats(stats) {
    // Token events arriving within one animation frame cost one render between them.
    const saving = stats.tokenEvents ? Math.round((1 - stats.flushes / stats.tokenEvents) * 100) : 0;
    const saved = saving > 0 ? ` (−${saving}%)` : "";
    const ttft = stats.timeToFirstTokenMs === null ? "" : ` · first token ${duration(stats.timeToFirstTokenMs)}`;
    const reconnects = `${stats.reconnects} reconnect${stats.reconnects === 1 ? "" : "s"}`;
    setText(this.stats, `${stats.tokenEvents} token events → ${stats.flushes} renders${saved} · ${reconnects}${ttft}`);
    this.stats.title = `${stats.events} events, ${stats.heartbeats} heartbeats, ~${stats.bytes} bytes, ` +
      `${stats.connects} connections, ${stats.heartbeatTimeouts} heartbeat timeouts`;
  }

  /** The end: `completed`, `cancelled`, `failed` (an error event) or `error` (not watched). */
  end(outcome, { done = null, error = null, stats = null } = {}) {
    this.answer.classList.remove("streaming");
    this.element.dataset.phase = "ended";
    this.element.dataset.outcome = outcome;
    this.bar.classList.remove("indeterminate");
    this.bar.classList.add(`bar-${outcome}`);
    if (outcome === "completed") this.setBar(100);
    setText(this.eta, "");
    const elapsed = duration(performance.now() - this.started);
    if (done) {
      const tokens = done.usage ? `${done.usage.completion_tokens} tokens · ` : "";
      const rate = this.progress?.tokens_per_second ? ` · ${this.progress.tokens_per_second.toFixed(0)} tok/s` : "";
      setText(this.progressText, `${tokens}${elapsed}${rate}`);
    }
    const labels = { completed: "completed", cancelled: "stopped: cancelled", failed: "failed", error: "not streamed", stopped: "stopped watching" };
    setText(this.outcome, labels[outcome] || outcome);
    this.outcome.className = `outcome outcome-${outcome}`;
    if (error) {
      this.error.hidden = false;
      const status = error.status ? `${error.status} ` : "";
      this.error.replaceChildren(h("strong", {}, `${status}${error.code}`), ` ${error.message}`);
      if (outcome === "error") setText(this.progressText, "");
    }
    if (stats) this.renderStats(stats);
  }
}

// ------------------------------------------------------------------------------ the page

class Demo {
  constructor() {
    this.params = new URLSearchParams(location.search);
    this.options = watchOptions(this.params);
    this.root = $("#chat");
    this.thread = $("[data-role=thread]");
    this.conn = $("[data-role=conn]");
    this.notice = $("[data-role=notice]");
    this.form = $("[data-role=prompt-form]");
    this.prompt = this.form.elements.namedItem("prompt");
    this.send = $("[data-role=send]");
    this.stopButton = $("[data-role=stop]");
    this.model = $("[data-role=model]");
    this.maxTokens = $("[name=max_tokens]");
    this.speed = $("[name=tokens_per_second]");
    this.speedField = $("[data-role=speed-field]");
    this.keyForm = $("[data-role=key-form]");
    this.keyInput = $("#api-key");
    this.keyToggle = $("[data-role=key-toggle]");
    this.apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
    this.providers = new Map([["fake", "fake"]]);
    /** @type {{role: string, content: string}[]} the conversation so far (ended turns) */
    this.history = [];
    this.watcher = null;
    this.turn = null;
  }

  start() {
    this.keyToggle.addEventListener("click", () => this.toggleKeyForm());
    this.keyForm.addEventListener("submit", (event) => {
      event.preventDefault();
      this.setKey(this.keyInput.value);
    });
    $("[data-role=key-forget]").addEventListener("click", () => this.setKey(""));
    this.keyInput.value = this.apiKey;
    this.showKey();
    const watchId = this.params.get("watch");
    if (watchId) this.startWatching(watchId, this.params.get("token") || null);
    else this.startChat();
  }

  // ------------------------------------------------------------------------- chat mode

  startChat() {
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.ask();
    });
    this.prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.form.requestSubmit();
      }
    });
    this.prompt.addEventListener("input", () => this.fitPrompt());
    this.stopButton.addEventListener("click", () => this.stop());
    this.model.addEventListener("change", () => this.syncOptions());
    this.loadModels();
    this.prompt.focus();
  }

  fitPrompt() {
    this.prompt.style.height = "auto";
    this.prompt.style.height = `${Math.min(this.prompt.scrollHeight, 200)}px`;
  }

  async loadModels() {
    let answer;
    try {
      const response = await fetch("/v1/models", { headers: this.authHeaders(), cache: "no-store" });
      if (response.status === 401) {
        this.say("This broker has auth on: enter an API key to chat.", "warn");
        this.toggleKeyForm(true);
        return;
      }
      if (!response.ok) throw new Error(`GET /v1/models answered ${response.status}`);
      answer = await response.json();
    } catch (error) {
      this.say(`Could not list the models (${error.message}); the fake model is still there.`, "warn");
      return;
    }
    const current = this.model.value || "fake";
    this.providers = new Map(answer.data.map((model) => [model.id, model.provider]));
    const ids = [...this.providers.keys()].sort((a, b) => (a === "fake" ? -1 : b === "fake" ? 1 : a.localeCompare(b)));
    this.model.replaceChildren(...ids.map((id) => h("option", { value: id, selected: id === current }, id)));
    this.syncOptions();
  }

  syncOptions() {
    const fake = this.providers.get(this.model.value) === "fake";
    this.speed.disabled = !fake;
    this.speedField.classList.toggle("disabled", !fake);
  }

  async ask() {
    const prompt = this.prompt.value.trim();
    if (!prompt || this.busy()) return;
    this.clearNotice();
    const model = this.model.value || "fake";
    const messages = [...this.history, { role: "user", content: prompt }];
    const body = { model, messages, metadata: { source: "demo", prompt: prompt.slice(0, PROMPT_METADATA_CHARS) } };
    const maxTokens = Number(this.maxTokens.value);
    if (Number.isInteger(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
    const speed = Number(this.speed.value);
    if (this.providers.get(model) === "fake" && speed > 0) body.fake = { tokens_per_second: speed };

    const turn = this.newTurn(prompt);
    turn.onEnd = (outcome) => {
      if (outcome === "completed" || outcome === "cancelled") {
        this.history.push({ role: "user", content: prompt }, { role: "assistant", content: turn.text.data });
      }
    };
    this.prompt.value = "";
    this.fitPrompt();
    this.setBusy(true);
    try {
      this.watcher = await createAndWatch(body, this.handlers(turn), { apiKey: this.apiKey || null, ...this.options });
    } catch (error) {
      turn.end("error", { error });
      this.ended("error");
      this.prompt.value = prompt; // nothing was sent: give the prompt back
      if (error.status === 401) this.toggleKeyForm(true);
      return;
    }
    turn.setStream(this.watcher.stream.id, this.watcher.stream.read_token ?? null);
    this.root.dataset.streamId = this.watcher.stream.id;
  }

  /** Stop = cancel the generation; the watch goes on until its `done` / `cancelled`. */
  async stop() {
    if (!this.watcher || this.watcher.ended) return;
    this.stopButton.disabled = true;
    setText(this.stopButton, "Stopping…");
    try {
      await this.watcher.cancel();
    } catch (error) {
      this.say(`Could not stop it: ${error.status ? `${error.status} ` : ""}${error.code}: ${error.message}`, "error");
      this.stopButton.disabled = false;
      setText(this.stopButton, "Stop");
    }
  }

  busy() {
    return this.watcher !== null && !this.watcher.ended && this.watcher.state !== States.CLOSED;
  }

  setBusy(busy) {
    this.send.hidden = busy;
    this.stopButton.hidden = !busy;
    this.stopButton.disabled = false;
    setText(this.stopButton, "Stop");
  }

  // ------------------------------------------------------------------- watch-only mode

  startWatching(streamId, token) {
    this.root.dataset.mode = "watch";
    this.root.dataset.streamId = streamId;
    $("[data-role=composer]").hidden = true;
    $("[data-role=watch-banner]").hidden = false;
    setText($("[data-role=watch-id]"), streamId);
    document.title = "streambroker chat · watching";
    const turn = this.newTurn(null);
    turn.setStream(streamId, token);
    turn.watchLink.hidden = true; // this is that tab
    const stopWatching = $("[data-role=stop-watching]");
    stopWatching.addEventListener("click", () => {
      stopWatching.disabled = true;
      if (this.watcher && !this.watcher.ended) {
        this.watcher.stop();
        turn.end("stopped", { stats: this.watcher.stats });
        this.ended("stopped");
      }
    });
    this.watcher = watch({ streamId, token }, this.handlers(turn), this.options);
  }

  // ------------------------------------------------------------------------- shared

  newTurn(prompt) {
    $("[data-role=empty]")?.remove();
    const turn = new Turn(prompt);
    this.turn = turn;
    this.thread.append(turn.element);
    this.root.dataset.phase = "connecting";
    delete this.root.dataset.outcome;
    turn.element.scrollIntoView({ block: "end" });
    return turn;
  }

  handlers(turn) {
    const stats = () => this.watcher?.stats;
    const finish = (outcome, detail) => {
      turn.end(outcome, { ...detail, stats: stats() });
      turn.onEnd?.(outcome);
      this.ended(outcome);
    };
    return {
      onStateChange: (state, { reason }) => {
        this.showConnection(state, reason);
        if (stats()) turn.renderStats(stats());
      },
      onMetadata: (metadata) => {
        if (turn.userRow.hidden) turn.setPrompt(metadata.metadata?.prompt);
      },
      onToken: (text) => {
        const follow = this.nearBottom();
        turn.append(text, stats());
        this.root.dataset.phase = "streaming";
        if (follow) window.scrollTo({ top: document.documentElement.scrollHeight });
      },
      onProgress: (progress, event) => turn.showProgress(progress, event, stats()),
      onDone: (done) => finish(done.finish_reason === "cancelled" ? "cancelled" : "completed", { done }),
      onError: (error) => finish(error.kind === "stream" ? "failed" : "error", { error }),
    };
  }

  ended(outcome) {
    this.root.dataset.phase = "ended";
    this.root.dataset.outcome = outcome;
    if (this.root.dataset.mode === "chat") {
      this.setBusy(false);
      this.prompt.focus();
    }
  }

  showConnection(state, reason) {
    this.root.dataset.conn = state;
    this.conn.dataset.state = state;
    this.conn.title = `the connection of the answer being watched: ${state} (${reason})`;
    setText(this.conn.lastChild, state);
  }

  nearBottom() {
    const page = document.documentElement;
    return page.scrollHeight - page.scrollTop - page.clientHeight < 120;
  }

  // ------------------------------------------------------------------------ API key

  authHeaders() {
    return this.apiKey ? { Authorization: `Bearer ${this.apiKey}` } : {};
  }

  toggleKeyForm(open = this.keyForm.hidden) {
    this.keyForm.hidden = !open;
    this.keyToggle.setAttribute("aria-expanded", String(open));
    if (open) this.keyInput.focus();
  }

  setKey(key) {
    this.apiKey = key.trim();
    if (this.apiKey) sessionStorage.setItem(KEY_STORAGE, this.apiKey);
    else sessionStorage.removeItem(KEY_STORAGE);
    this.keyInput.value = this.apiKey;
    this.showKey();
    this.toggleKeyForm(false);
    this.clearNotice();
    if (this.root.dataset.mode === "chat") this.loadModels();
  }

  showKey() {
    setText(this.keyToggle, this.apiKey ? `API key …${this.apiKey.slice(-4)}` : "API key");
    this.keyToggle.classList.toggle("has-key", Boolean(this.apiKey));
  }

  say(message, level = "info") {
    this.notice.hidden = false;
    this.notice.className = `notice notice-${level}`;
    setText(this.notice, message);
  }

  clearNotice() {
    this.notice.hidden = true;
  }
}

const demo = new Demo();
demo.start();
// For the curious (and the browser tests): the page's state, e.g. `streambrokerDemo.watcher.stats`.
globalThis.streambrokerDemo = demo;
