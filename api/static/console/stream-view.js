// One stream: its text as it arrives (live, or replayed at a chosen speed), progress with
// ETA, the connection state, its state summary, cancel / export, and the raw event log.
// Watching goes through /static/streambroker.js, the same client any web page would use.

import { States, watch } from "/static/streambroker.js";
import { ApiError } from "./api.js";
import { copyText, h, select, setText } from "./dom.js";
import { EventLog } from "./event-log.js";
import { DASH, bytes, clock, duration, integer, percent, rate, seamNote } from "./format.js";

const SPEEDS = ["0.5", "1", "2", "5", "10", "50"];
const STATE_POLL_MS = 1000;
const TERMINAL = new Set(["completed", "failed", "cancelled"]);

export class StreamView {
  /**
   * @param {import("./console.js").Context} ctx
   * @param {string} streamId
   * @param {URLSearchParams} params `mode=live|replay`, `speed=<x>`
   */
  constructor(ctx, streamId, params) {
    this.ctx = ctx;
    this.streamId = streamId;
    this.readParams(params);
    this.watcher = null;
    this.token = null;
    this.state = null;
    this.stateTimer = null;
    this.stopped = false;
    this.run = 0; // increases with every (re)start; late answers of older runs are ignored
  }

  readParams(params) {
    this.mode = params.get("mode") === "replay" ? "replay" : "live";
    const speed = Number(params.get("speed"));
    this.speed = Number.isFinite(speed) && speed > 0 ? speed : 1;
  }

  mount(container) {
    this.element = this.build();
    container.replaceChildren(this.element);
    this.start();
    this.pollState();
  }

  unmount() {
    this.stopped = true;
    if (this.watcher) this.watcher.stop();
    clearTimeout(this.stateTimer);
    this.log.stop();
    for (const key of ["state", "watch", "cancel", "export"]) this.ctx.notices.clear(key);
  }

  /** The hash changed to this same stream with other parameters: restart with them. */
  apply(params) {
    this.readParams(params);
    this.syncControls();
    this.start();
  }

  // ---------------------------------------------------------------- building the view

  build() {
    this.log = new EventLog(500);
    const view = h(
      "section",
      { class: "view view-stream", dataset: { view: "stream", streamId: this.streamId, mode: this.mode } },
      this.buildHeader(),
      this.buildControls(),
      this.buildProgress(),
      h(
        "div",
        { class: "stream-grid" },
        this.buildOutput(),
        this.buildSummary(),
      ),
      this.log.element,
    );
    this.syncControls();
    return view;
  }

  buildHeader() {
    const id = this.streamId;
    this.badge = h("span", { class: "badge", dataset: { role: "status" } }, "…");
    this.subtitle = h("span", { class: "muted", dataset: { role: "subtitle" } });
    this.cancelButton = h("button", { type: "button", class: "button danger", dataset: { role: "cancel" }, onclick: () => this.cancel(), disabled: true }, "Cancel");
    // Export needs the API key (a read token reads state and events only), so it is fetched
    // with the key's header and saved from memory rather than linked.
    const readOnly = this.ctx.session.readOnly;
    this.exportButton = h("button", { type: "button", class: "button", dataset: { role: "export" }, onclick: () => this.exportStream(), disabled: readOnly, title: readOnly ? "export needs an API key: a read token reads this stream only" : "download the stream as JSON lines" }, "Export");
    this.linkButton = h("button", { type: "button", class: "button", title: "a link to this view (read-only, with a read token when auth is on)", onclick: () => this.copyLink() }, "Copy link");
    return h(
      "div",
      { class: "toolbar" },
      h("a", { href: "#/streams", class: "crumb" }, "Streams"),
      h("span", { class: "crumb-sep" }, "/"),
      h("h1", { class: "mono stream-id", title: id }, id),
      h("button", { type: "button", class: "icon-button", title: "Copy the stream id", onclick: () => copyText(id) }, "copy"),
      this.badge,
      h("span", { class: "chip chip-readonly", hidden: !this.ctx.session.readOnly, title: "opened with a read token: it reads this stream only" }, "read-only"),
      this.subtitle,
      h("div", { class: "spacer" }),
      this.linkButton,
      this.exportButton,
      this.cancelButton,
    );
  }

  buildControls() {
    const modeButton = (mode, label) => h("button", { type: "button", role: "radio", dataset: { mode }, onclick: () => this.setMode(mode) }, label);
    this.modeButtons = { live: modeButton("live", "Live"), replay: modeButton("replay", "Replay") };
    const speeds = [...SPEEDS.map((s) => [s, `${s}×`]), ["custom", "custom…"]];
    this.speedSelect = select({ "aria-label": "Replay speed", dataset: { role: "speed" }, onchange: () => this.speedChosen() }, speeds, "1");
    this.speedInput = h("input", { type: "number", min: "0.01", max: "1000", step: "any", class: "speed-input", "aria-label": "Custom replay speed", dataset: { role: "speed-custom" }, onchange: () => this.speedTyped() });
    this.conn = h("span", { class: "conn", dataset: { role: "conn" }, "aria-live": "polite" }, h("i"), h("span", null, "idle"));
    return h(
      "div",
      { class: "controls panel" },
      h("div", { class: "segmented", role: "radiogroup", "aria-label": "Mode" }, this.modeButtons.live, this.modeButtons.replay),
      h("label", { class: "speed" }, h("span", { class: "muted" }, "speed"), this.speedSelect, this.speedInput),
      h("button", { type: "button", class: "button", dataset: { role: "restart" }, onclick: () => this.start() }, "Restart"),
      h("div", { class: "spacer" }),
      this.conn,
    );
  }

  buildProgress() {
    this.bar = h("div", { class: "bar-fill" });
    this.barTrack = h("div", { class: "bar", role: "progressbar", "aria-label": "Progress", "aria-valuemin": 0, "aria-valuemax": 100 }, this.bar);
    this.progressText = h("span", { dataset: { role: "progress-text" } });
    this.eta = h("span", { class: "muted", dataset: { role: "eta" } });
    this.elapsed = h("span", { class: "muted", dataset: { role: "elapsed" } });
    this.clientStats = h("div", { class: "client-stats muted", dataset: { role: "client-stats" } });
    return h(
      "div",
      { class: "progress panel", dataset: { role: "progress" } },
      this.barTrack,
      h("div", { class: "progress-line" }, this.progressText, this.eta, h("div", { class: "spacer" }), this.elapsed),
      this.clientStats,
    );
  }

  buildOutput() {
    // One text node that only ever grows (appendData): exact text, cheap to extend. A
    // `resumed` event starts the next one after a seam marker (see seam()).
    this.textNode = document.createTextNode("");
    this.output = h("div", { class: "output", dataset: { role: "output" }, tabindex: 0, "aria-label": "Generated text" }, this.textNode);
    this.outputError = h("div", { class: "output-error", dataset: { role: "stream-error" }, hidden: true });
    this.toolCalls = h("div", { class: "tool-calls", hidden: true });
    return h("div", { class: "panel output-panel" }, h("div", { class: "panel-title" }, "Output"), this.outputError, this.output, this.toolCalls);
  }

  buildSummary() {
    this.summary = h("dl", { class: "summary", dataset: { role: "summary" } });
    return h("div", { class: "panel summary-panel" }, h("div", { class: "panel-title" }, "State"), this.summary);
  }

  syncControls() {
    for (const [mode, button] of Object.entries(this.modeButtons)) {
      button.setAttribute("aria-checked", String(mode === this.mode));
      button.classList.toggle("active", mode === this.mode);
    }
    const preset = SPEEDS.includes(String(this.speed));
    this.speedSelect.value = preset ? String(this.speed) : "custom";
    this.speedInput.value = String(this.speed);
    this.speedInput.hidden = preset;
    this.speedSelect.disabled = this.mode !== "replay";
    this.speedInput.disabled = this.mode !== "replay";
    if (this.element) this.element.dataset.mode = this.mode;
  }

  // ------------------------------------------------------------------- controls

  setMode(mode) {
    this.mode = mode;
    this.updateHash();
  }

  speedChosen() {
    if (this.speedSelect.value === "custom") {
      this.speedInput.hidden = false;
      this.speedInput.focus();
      return;
    }
    this.speed = Number(this.speedSelect.value);
    this.updateHash();
  }

  speedTyped() {
    const speed = Number(this.speedInput.value);
    if (!(speed >= 0.01 && speed <= 1000)) {
      this.ctx.notices.error("watch", { code: "invalid_speed", message: "a replay speed is from 0.01 to 1000" });
      return;
    }
    this.speed = speed;
    this.updateHash();
  }

  /** Mode and speed live in the hash, so a link reproduces the view; replaceState: no
   * history entry per click, and no re-mount by the router. */
  updateHash() {
    const query = this.mode === "replay" ? `?mode=replay&speed=${this.speed}` : "";
    history.replaceState(null, "", `#/streams/${this.streamId}${query}`);
    this.syncControls();
    this.start();
  }

  // -------------------------------------------------------------------- watching

  async exportStream() {
    const id = this.streamId;
    try {
      const response = await fetch(`/v1/streams/${encodeURIComponent(id)}/export`, { headers: this.ctx.session.authHeaders(), cache: "no-store" });
      if (!response.ok) throw await ApiError.fromResponse(response);
      const url = URL.createObjectURL(await response.blob());
      const link = h("a", { href: url, download: `${id}.jsonl`, hidden: true });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (error) {
      this.ctx.notices.error("export", error, "exporting");
    }
  }

  async start() {
    const run = ++this.run;
    if (this.watcher) this.watcher.stop();
    this.watcher = null;
    this.reset();
    let token;
    try {
      token = await this.ctx.session.tokenFor(this.streamId);
    } catch (error) {
      if (run !== this.run || this.stopped) return;
      this.failed(error);
      return;
    }
    if (run !== this.run || this.stopped) return;
    this.token = token;
    this.watcher = watch(
      { streamId: this.streamId, token, replay: this.mode === "replay" ? this.speed : null },
      {
        onStateChange: (state) => {
          this.showConnection(state);
          if (state === States.OPEN) this.refreshState(); // the viewer count includes us now
        },
        onEvent: (event) => {
          if (this.firstEventAt === null) this.firstEventAt = event.receivedAt;
          this.log.push(event);
        },
        onToken: (text) => this.appendText(text),
        onToolCall: (delta) => this.toolCall(delta),
        onProgress: (progress, event) => this.showProgress(progress, event),
        onResumed: (resumed) => this.seam(resumed),
        onDone: (done, event) => this.ended(done.finish_reason === "cancelled" ? "cancelled" : "completed", event, done),
        onError: (error, event) => (error.kind === "stream" ? this.ended("failed", event, null, error) : this.failed(error)),
      },
    );
  }

  reset() {
    // Back to one empty text node: the seams of the previous run go with its text.
    this.textNode = document.createTextNode("");
    this.output.replaceChildren(this.textNode);
    this.firstEventAt = null;
    this.progress = null;
    this.tools = new Map();
    this.toolCalls.replaceChildren();
    this.toolCalls.hidden = true;
    this.outputError.hidden = true;
    this.output.classList.add("streaming");
    this.log.clear();
    this.element.dataset.phase = "connecting";
    delete this.element.dataset.outcome;
    delete this.element.dataset.elapsedMs;
    this.setBar(0);
    this.bar.className = "bar-fill";
    setText(this.progressText, this.mode === "replay" ? `replaying at ${this.speed}×` : "waiting for the first event");
    setText(this.eta, "");
    setText(this.elapsed, "");
    this.ctx.notices.clear("watch");
    this.showStats();
  }

  showConnection(state) {
    this.element.dataset.conn = state;
    this.conn.className = `conn conn-${state}`;
    const label = state === States.OPEN && this.mode === "replay" ? `open · replay ${this.speed}×` : state;
    setText(this.conn.lastChild, label);
    this.showStats();
  }

  appendText(text) {
    // appendData on one text node: no re-layout of what is already there, and the text is
    // exactly what arrived (whitespace kept by CSS `white-space: pre-wrap`).
    this.textNode.appendData(text);
    this.element.dataset.phase = "streaming";
    this.renderProgress();
    this.showStats();
  }

  /** Where another attempt went on with the answer: an empty marker element between the
   * text before and after (drawn by CSS), so the text itself, and the output's
   * textContent, stay exactly the answer. */
  seam(resumed) {
    const note = seamNote(resumed);
    const marker = h("span", { class: "seam", dataset: { role: "seam", attempt: String(resumed.attempt ?? "") }, title: note, "aria-label": note, role: "separator" });
    this.textNode = document.createTextNode("");
    this.output.append(marker, this.textNode);
  }

  toolCall(delta) {
    const index = delta.index ?? 0;
    let call = this.tools.get(index);
    if (!call) {
      const name = h("strong");
      const args = h("code");
      call = { name, args, text: "" };
      this.tools.set(index, call);
      this.toolCalls.append(h("div", { class: "tool-call" }, h("span", { class: "muted" }, `tool_call ${index} `), name, "(", args, ")"));
      this.toolCalls.hidden = false;
    }
    if (delta.name) setText(call.name, delta.name);
    call.text += delta.arguments || "";
    setText(call.args, call.text);
  }

  showProgress(progress, event) {
    this.progress = { ...progress, receivedAt: event.receivedAt };
    this.renderProgress();
  }

  /** Progress events come every 500 ms; between them the bar and the ETA follow the tokens
   * that arrived, so the bar never lags the text it describes. */
  renderProgress() {
    const progress = this.progress;
    if (!progress) return;
    const stats = this.watcher ? this.watcher.stats : { tokens: 0 };
    const tokens = Math.max(progress.tokens || 0, stats.tokens);
    const total = progress.estimated_total;
    const share = total ? Math.min(100, (tokens / total) * 100) : null;
    this.bar.classList.toggle("indeterminate", share === null);
    if (share !== null) this.setBar(share);
    const of = total ? ` / ${integer(total)}` : "";
    setText(this.progressText, `${percent(share)} · ${integer(tokens)}${of} tokens · ${rate(progress.tokens_per_second)} tok/s`);
    // Recorded figures describe the original pace; a replay runs `speed` times faster.
    const scale = this.mode === "replay" ? this.speed : 1;
    if (progress.eta_ms === null || progress.eta_ms === undefined) return setText(this.eta, "");
    const eta = Math.max(0, progress.eta_ms / scale - (performance.now() - progress.receivedAt));
    setText(this.eta, `ETA ${duration(eta)}`);
  }

  setBar(share) {
    this.bar.style.width = `${share}%`; // CSSOM, not a style attribute: allowed by the CSP
    this.barTrack.setAttribute("aria-valuenow", String(Math.round(share)));
  }

  ended(outcome, event, done, error = null) {
    this.output.classList.remove("streaming");
    this.element.dataset.phase = "ended";
    this.element.dataset.outcome = outcome;
    if (event && this.firstEventAt !== null) {
      const elapsed = event.receivedAt - this.firstEventAt;
      this.element.dataset.elapsedMs = String(Math.round(elapsed));
      const how = this.mode === "replay" ? `replayed at ${this.speed}× in` : "received in";
      setText(this.elapsed, `${how} ${duration(elapsed)}`);
    }
    this.bar.classList.remove("indeterminate");
    this.bar.classList.add(`bar-${outcome}`);
    if (outcome === "completed") this.setBar(100);
    setText(this.eta, "");
    if (done) {
      const usage = done.usage ? ` · ${integer(done.usage.completion_tokens)} tokens` : "";
      setText(this.progressText, `${outcome} · finish_reason ${done.finish_reason ?? DASH}${usage}`);
    }
    if (error) {
      this.outputError.hidden = false;
      this.outputError.replaceChildren(h("strong", null, error.code), ` ${error.message}${error.retryable ? " (retryable)" : ""}`);
      setText(this.progressText, `failed · ${error.code}`);
    }
    this.showStats();
    this.refreshState();
  }

  /** The watch cannot go on (401, 404, 410, no token): say why, where the text would be. */
  failed(error) {
    this.output.classList.remove("streaming");
    this.element.dataset.phase = "ended";
    this.element.dataset.outcome = "error";
    this.outputError.hidden = false;
    const status = error.status ? `${error.status} ` : "";
    this.outputError.replaceChildren(h("strong", null, `${status}${error.code}`), ` ${error.message}`);
    this.bar.classList.add("bar-failed");
    setText(this.progressText, "not watching");
    if (error.status === 401) this.ctx.focusKey();
  }

  showStats() {
    const stats = this.watcher ? this.watcher.stats : null;
    if (!stats) return setText(this.clientStats, "");
    const ttft = stats.timeToFirstTokenMs === null ? DASH : `${stats.timeToFirstTokenMs} ms`;
    setText(this.clientStats, `client: ${integer(stats.events)} events · ${integer(stats.tokens)} tokens · ~${bytes(stats.bytes)} · first token after ${ttft} · ${stats.reconnects} reconnects`);
  }

  // ------------------------------------------------------------- state and actions

  async pollState() {
    clearTimeout(this.stateTimer);
    if (this.stopped) return;
    const again = await this.refreshState();
    if (again && !this.stopped) this.stateTimer = setTimeout(() => this.pollState(), STATE_POLL_MS);
  }

  /** Read and show the state; true while it is worth reading again (not ended, not refused). */
  async refreshState() {
    try {
      const token = this.token || this.ctx.session.tokens.get(this.streamId)?.token || null;
      const state = await this.ctx.api.getStream(this.streamId, token);
      if (this.stopped) return false;
      this.state = state;
      this.ctx.notices.clear("state");
      this.renderState(state);
      return !TERMINAL.has(state.status);
    } catch (error) {
      if (this.stopped) return false;
      this.ctx.notices.error("state", error, "reading the stream's state");
      const final = { 401: "locked", 404: "not found" }[error.status];
      if (final && !this.state) {
        this.badge.className = "badge status-failed";
        setText(this.badge, final);
      }
      return !final;
    }
  }

  renderState(state) {
    this.badge.className = `badge status-${state.status}`;
    setText(this.badge, state.status);
    setText(this.subtitle, `${state.model}${state.tenant ? ` · ${state.tenant}` : ""}`);
    const terminal = TERMINAL.has(state.status);
    this.cancelButton.disabled = terminal || this.ctx.session.readOnly;
    this.cancelButton.title = this.ctx.session.readOnly ? "a read token cannot cancel: enter an API key" : "";
    const usage = state.usage ? `${state.usage.prompt_tokens} + ${state.usage.completion_tokens} = ${state.usage.total_tokens}` : DASH;
    const rows = [
      ["status", state.status],
      ["model", state.model],
      ["tenant", state.tenant || DASH],
      ["created", clock(state.created_at)],
      ["started", clock(state.started_at)],
      ["first token", clock(state.first_token_at)],
      ["finished", clock(state.finished_at)],
      ["TTFT", state.time_to_first_token_ms === null ? DASH : `${integer(state.time_to_first_token_ms)} ms`],
      ["duration", duration(state.duration_ms)],
      ["tokens/s", rate(state.tokens_per_second)],
      ["usage", usage],
      ["finish reason", state.finish_reason || DASH],
      ["error", state.error ? `${state.error.code}: ${state.error.message}` : DASH],
      ["viewers", `${integer(state.connections)} (${integer(state.resumes)} resumed)`],
      ["last event id", integer(state.last_event_id)],
      ["attempt", integer(state.attempt)],
      ["continuations", integer(state.continuations)],
      // Only while a continuation waits for a worker to pick it up.
      ...(state.handover ? [["handover", `${state.handover.reason} · waiting since ${clock(state.handover.since)}`]] : []),
      ["lost after", state.lost_after_event_id === null ? DASH : integer(state.lost_after_event_id)],
    ];
    const metadata = Object.entries(state.metadata || {});
    this.summary.replaceChildren(
      ...rows.flatMap(([name, value]) => [h("dt", null, name), h("dd", { dataset: { field: name.replace(/ /g, "_") } }, value)]),
      h("dt", null, "metadata"),
      h("dd", { dataset: { field: "metadata" } }, metadata.length ? metadata.map(([k, v]) => h("span", { class: "chip" }, `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`)) : DASH),
    );
  }

  async cancel() {
    this.cancelButton.disabled = true;
    try {
      const state = await this.ctx.api.cancelStream(this.streamId);
      this.ctx.notices.clear("cancel");
      this.state = state;
      this.renderState(state); // the state poll, still running, follows it to `cancelled`
    } catch (error) {
      this.ctx.notices.error("cancel", error, "cancelling");
      this.cancelButton.disabled = false;
    }
  }

  async copyLink() {
    const base = `${location.origin}/console`;
    const link = this.token
      ? `${base}?stream=${this.streamId}&token=${encodeURIComponent(this.token)}`
      : `${base}#/streams/${this.streamId}`;
    const copied = await copyText(link);
    setText(this.linkButton, copied ? "Copied" : "Copy failed");
    setTimeout(() => setText(this.linkButton, "Copy link"), 1500);
  }
}
