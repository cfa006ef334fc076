/**
 * streambroker.js: a dependency-free browser client for streambroker's event streams.
 *
 *     import { watch } from "/static/streambroker.js";
 *     const watcher = watch({ streamId, token }, {
 *       onToken: (text) => output.append(text),
 *       onDone: (done) => console.log(done.finish_reason),
 *     });
 *     // later: watcher.stop();
 *
 * It is a thin layer over the browser's native EventSource, which already resumes after a
 * dropped connection with the `Last-Event-ID` header (the broker then sends every later event
 * exactly once). What EventSource does not do, this module adds:
 *
 * - A terminal event ends the watch. The response ends after `done` / `error`, and a plain
 *   EventSource would reconnect and get 204; this closes instead.
 * - EventSource gives up for good (readyState CLOSED) on any answer that is not a 200 event
 *   stream: 204, 4xx, 5xx, a proxy's HTML error page. This module then asks the same URL once
 *   with fetch() to learn the status and the broker's JSON error, and reconnects with
 *   exponential backoff for the transient ones (429, 5xx, network) or stops with a typed
 *   error for the final ones (401, 404, 410, ...). It reconnects with `?last_event_id=`,
 *   since a new EventSource cannot be given a Last-Event-ID header.
 * - The SSE event named `error` (a generation's terminal error, a MessageEvent with data) and
 *   a connection error (a plain Event) arrive on the same listener; they are told apart.
 * - A silent connection is replaced: no event for `heartbeatTimeoutMs` reconnects (a dead
 *   NAT entry or proxy can leave a socket open with nothing arriving, and no error ever
 *   comes). EventSource hides the server's `: ping` comments from scripts, so "silence" here
 *   means no *event*: keep the timeout well above the longest pause a model makes (the
 *   default is three default server heartbeats). A reconnect loses nothing: it resumes.
 * - Tokens are delivered at most once per animation frame, concatenated, so a fast stream
 *   costs one DOM update per frame instead of one per token.
 * - `stats`: reconnects, events, approximate bytes, time to first token.
 *
 * Auth: with auth on, a browser reads a stream with a read token (`?token=`), because
 * EventSource cannot send an `Authorization` header. The create answer carries one; for an
 * existing stream, `readToken()` gets one with the tenant's API key.
 *
 * @module streambroker
 */

/** Connection states reported to `onStateChange`. */
export const States = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

/** The event types the broker sends (README, "Event types"). */
export const EVENT_TYPES = Object.freeze(["metadata", "token", "tool_call", "progress", "done", "error"]);

/** HTTP statuses worth retrying: the broker is busy or briefly unreachable. */
const TRANSIENT_STATUSES = new Set([408, 425, 429, 500, 502, 503, 504]);

const DEFAULT_OPTIONS = Object.freeze({
  heartbeatTimeoutMs: 45_000,
  minBackoffMs: 500,
  maxBackoffMs: 30_000,
  batchTokens: true,
  /** Token flush fallback while requestAnimationFrame is paused (a hidden tab). */
  hiddenFlushMs: 100,
});

/**
 * Where to watch: either the events URL (`https://host/v1/streams/<id>/events?token=...`,
 * relative to the page is fine) or its parts.
 * @typedef {object} WatchTarget
 * @property {string} streamId
 * @property {string} [baseUrl] the broker's origin (and path prefix); default: this page's origin
 * @property {string|null} [token] a read token (`?token=`), needed when the broker has auth on
 * @property {number} [lastEventId] resume after this event id; 0 (default) = from the beginning
 * @property {number|null} [replay] replay recorded events at this speed (1 = as recorded)
 */

/**
 * One event as received: what `onEvent` gets, and the second argument of the typed handlers.
 * @typedef {object} RawEvent
 * @property {number} id the SSE id (dense: 1, 2, 3...)
 * @property {string} type `metadata`, `token`, `tool_call`, `progress`, `done` or `error`
 * @property {object|null} data the parsed `data` JSON (null if it was not JSON)
 * @property {string} raw the `data` line as sent
 * @property {number} receivedAt `performance.now()` when it arrived
 */

/**
 * Every handler is optional. Except `onStateChange`, none runs after `stop()` returned.
 * @typedef {object} Handlers
 * @property {(text: string, event: RawEvent) => void} [onToken] text of every token event
 *   since the previous call, concatenated (at most one call per animation frame); `event` is
 *   the last of them
 * @property {(delta: object, event: RawEvent) => void} [onToolCall] a tool-call delta
 *   (`index`, `id`, `name`, `arguments` fragment)
 * @property {(progress: object, event: RawEvent) => void} [onProgress] `tokens`,
 *   `tokens_per_second`, `estimated_total`, `percent`, `eta_ms` (the last three may be null)
 * @property {(metadata: object, event: RawEvent) => void} [onMetadata] the first event
 * @property {(done: object, event: RawEvent|null) => void} [onDone] terminal: `finish_reason`,
 *   `usage`; `event` is null when the stream had ended before the resume point (the values
 *   then come from the stream's state)
 * @property {(error: StreamError, event: RawEvent|null) => void} [onError] terminal: the
 *   generation failed (`error.kind === "stream"`, with the event), or the watch cannot go on
 *   (`"http"`: 401, 404, 410 ...; `event` is null). Transient failures are not reported here:
 *   they show as `reconnecting`
 * @property {(state: string, detail: {reason: string}) => void} [onStateChange] one of
 *   `States`
 * @property {(event: RawEvent) => void} [onEvent] every event, as it arrives (a raw log)
 */

/**
 * @typedef {object} WatchOptions
 * @property {number} [heartbeatTimeoutMs] reconnect after this long without an event (45 s)
 * @property {number} [minBackoffMs] first reconnect delay after EventSource gave up (0.5 s)
 * @property {number} [maxBackoffMs] longest reconnect delay (30 s)
 * @property {boolean} [batchTokens] deliver tokens once per animation frame (true)
 */

/** An error that ends a watch: a generation's terminal `error` event, or an HTTP refusal. */
export class StreamError extends Error {
  /**
   * @param {string} code the broker's code (`fake_failure`, `stream_not_found`, ...)
   * @param {string} message
   * @param {{kind?: "stream"|"http", status?: number|null, retryable?: boolean, data?: object|null}} [more]
   */
  constructor(code, message, { kind = "stream", status = null, retryable = false, data = null } = {}) {
    super(message);
    this.name = "StreamError";
    this.code = code;
    this.kind = kind;
    this.status = status;
    this.retryable = retryable;
    this.data = data;
  }

  /** From an HTTP answer in the broker's shape `{"error": {"code", "message"}}`, or any other. */
  static async fromResponse(response) {
    let code = `http_${response.status}`;
    let message = `${response.status} ${response.statusText}`.trim();
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error.code === "string") {
        code = body.error.code;
        message = body.error.message || message;
      }
    } catch {
      // Not JSON (a proxy's page): the status says enough.
    }
    const retryable = TRANSIENT_STATUSES.has(response.status);
    return new StreamError(code, message, { kind: "http", status: response.status, retryable });
  }
}

/**
 * Get a read token for one stream with the tenant's API key (`POST .../read_token`).
 * Answers `{read_token: null}` when the broker has auth off (no token needed).
 * @param {{baseUrl?: string, streamId: string, apiKey?: string|null}} args
 * @returns {Promise<{read_token: string|null, expires_at: string|null}>}
 */
export async function readToken({ baseUrl = "", streamId, apiKey = null }) {
  const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
  const url = `${baseUrl}/v1/streams/${encodeURIComponent(streamId)}/read_token`;
  const response = await fetch(url, { method: "POST", headers });
  if (!response.ok) throw await StreamError.fromResponse(response);
  return response.json();
}

/**
 * The events URL of a target, resuming after `lastEventId`.
 * @param {WatchTarget} target
 * @param {number} [lastEventId]
 */
export function eventsUrl(target, lastEventId = target.lastEventId || 0) {
  const params = new URLSearchParams();
  if (target.token) params.set("token", target.token);
  if (target.replay != null) params.set("replay", String(target.replay));
  if (lastEventId > 0) params.set("last_event_id", String(lastEventId));
  const query = params.toString();
  const base = `${target.baseUrl || ""}/v1/streams/${encodeURIComponent(target.streamId)}/events`;
  return query ? `${base}?${query}` : base;
}

/** The state URL (`GET /v1/streams/{id}`) of a target, with its token. */
export function stateUrl(target) {
  const query = target.token ? `?token=${encodeURIComponent(target.token)}` : "";
  return `${target.baseUrl || ""}/v1/streams/${encodeURIComponent(target.streamId)}${query}`;
}

/**
 * @param {string|URL|WatchTarget} target
 * @returns {WatchTarget}
 */
export function resolveTarget(target) {
  if (typeof target !== "string" && !(target instanceof URL)) {
    if (!target || typeof target.streamId !== "string" || !target.streamId) {
      throw new TypeError("watch(): give an events URL or {streamId, ...}");
    }
    return { baseUrl: "", token: null, lastEventId: 0, replay: null, ...target };
  }
  const url = new URL(String(target), globalThis.location ? globalThis.location.href : undefined);
  const match = url.pathname.match(/^(.*)\/v1\/streams\/([^/]+)\/events$/);
  if (!match) throw new TypeError(`watch(): not an events URL: ${url.pathname}`);
  const replay = url.searchParams.get("replay");
  return {
    baseUrl: url.origin + match[1],
    streamId: decodeURIComponent(match[2]),
    token: url.searchParams.get("token"),
    lastEventId: Number(url.searchParams.get("last_event_id")) || 0,
    replay: replay === null ? null : Number(replay),
  };
}

/** Watches one stream; see the module comment. Most callers use `watch()`. */
export class StreamWatcher {
  /**
   * @param {string|URL|WatchTarget} target
   * @param {Handlers} [handlers]
   * @param {WatchOptions} [options]
   */
  constructor(target, handlers = {}, options = {}) {
    this.target = resolveTarget(target);
    this.handlers = handlers;
    this.options = { ...DEFAULT_OPTIONS, ...options };
    /** @type {string} one of `States`; `closed` until `start()` */
    this.state = States.CLOSED;
    /** The id of the last event received: where a reconnect resumes. */
    this.lastEventId = this.target.lastEventId || 0;
    /** True once a terminal event (or a final refusal) ended the watch. */
    this.ended = false;
    this.stats = {
      reconnects: 0,
      connectionErrors: 0,
      heartbeatTimeouts: 0,
      events: 0,
      tokens: 0,
      /** Approximate bytes of the frames received (the data, ids and field names). */
      bytes: 0,
      /** ms from `start()` to the first token event, null until then. */
      timeToFirstTokenMs: null,
      startedAt: null,
    };
    this._source = null;
    this._stopped = false;
    this._attempt = 0;
    this._heartbeat = null;
    this._retry = null;
    this._pending = { text: "", last: null, frame: null, timer: null };
  }

  /** Open the connection (once). @returns {this} */
  start() {
    if (this.stats.startedAt !== null) return this;
    this.stats.startedAt = now();
    this._open(States.CONNECTING, "start");
    return this;
  }

  /** Close for good: no reconnect; tokens not yet delivered are dropped. */
  stop() {
    if (this._stopped) return;
    this._stopped = true;
    this._close();
    this._dropPendingTokens();
    this._setState(States.CLOSED, "stopped");
  }

  _open(state, reason) {
    this._setState(state, reason);
    const source = new EventSource(eventsUrl(this.target, this.lastEventId));
    this._source = source;
    source.addEventListener("open", () => {
      if (source !== this._source) return;
      this._setState(States.OPEN, "open");
      this._armHeartbeat();
    });
    for (const type of EVENT_TYPES) {
      if (type === "error") continue;
      source.addEventListener(type, (event) => this._onFrame(source, event));
    }
    // One listener gets both the SSE event named "error" and connection errors.
    source.addEventListener("error", (event) => this._onErrorEvent(source, event));
    this._armHeartbeat();
  }

  _onErrorEvent(source, event) {
    if (source !== this._source) return;
    if (event instanceof MessageEvent) {
      this._onFrame(source, event); // a terminal `error` event of the generation
      return;
    }
    this.stats.connectionErrors += 1;
    if (source.readyState === EventSource.CONNECTING) {
      // A dropped connection: EventSource retries by itself after `retry:`, with the
      // Last-Event-ID header. The heartbeat stays armed in case that retry hangs.
      this.stats.reconnects += 1;
      this._setState(States.RECONNECTING, "connection lost");
      return;
    }
    // CLOSED: EventSource gave up (an answer other than a 200 event stream). Find out why.
    this._close();
    this._setState(States.RECONNECTING, "connection refused");
    this._diagnose();
  }

  /** Ask the events URL once with fetch() to learn what EventSource could not tell us. */
  async _diagnose() {
    const controller = new AbortController();
    let response;
    try {
      response = await fetch(eventsUrl(this.target, this.lastEventId), {
        headers: { Accept: "text/event-stream" },
        cache: "no-store",
        signal: controller.signal,
      });
    } catch {
      if (!this._stopped) this._scheduleReconnect("network error");
      return;
    }
    if (response.ok) controller.abort(); // only the status was wanted, not the stream
    if (this._stopped) return;
    if (response.status === 204) {
      await this._endFromState(); // the resume point was at or after the terminal event
    } else if (response.ok) {
      this._scheduleReconnect("retrying");
    } else {
      const error = await StreamError.fromResponse(response);
      if (this._stopped) return;
      if (error.retryable) this._scheduleReconnect(error.code, retryAfterMs(response));
      else this._fail(error);
    }
  }

  /** A stream that had ended before our resume point: report its end from its state. */
  async _endFromState() {
    let state = null;
    try {
      const response = await fetch(stateUrl(this.target), { cache: "no-store" });
      if (response.ok) state = await response.json();
    } catch {
      // The end itself is certain (204); only its details are missing.
    }
    if (this._stopped) return;
    this.ended = true;
    if (state && state.status === "failed" && state.error) {
      const { code, message, retryable } = state.error;
      this._emit("onError", new StreamError(code, message, { retryable, data: state.error }), null);
    } else {
      this._emit("onDone", {
        finish_reason: state ? state.finish_reason : null,
        usage: state ? state.usage : null,
      }, null);
    }
    this._setState(States.CLOSED, "ended");
  }

  _scheduleReconnect(reason, atLeastMs = 0) {
    const { minBackoffMs, maxBackoffMs } = this.options;
    const ceiling = Math.min(maxBackoffMs, minBackoffMs * 2 ** this._attempt);
    this._attempt += 1;
    // Full jitter over the upper half: many tabs cut by one outage do not return in step.
    const delay = Math.max(atLeastMs, ceiling / 2 + Math.random() * (ceiling / 2));
    this.stats.reconnects += 1;
    this._setState(States.RECONNECTING, reason);
    clearTimeout(this._retry);
    this._retry = setTimeout(() => {
      this._retry = null;
      if (!this._stopped && !this.ended) this._open(States.RECONNECTING, reason);
    }, delay);
  }

  _armHeartbeat() {
    clearTimeout(this._heartbeat);
    this._heartbeat = setTimeout(() => this._onSilence(), this.options.heartbeatTimeoutMs);
  }

  _onSilence() {
    this._heartbeat = null;
    if (this._stopped || this.ended || this._source === null) return;
    this.stats.heartbeatTimeouts += 1;
    this.stats.reconnects += 1;
    this._close();
    this._open(States.RECONNECTING, "heartbeat timeout");
  }

  _onFrame(source, message) {
    if (source !== this._source || this.ended) return;
    const id = Number(message.lastEventId) || 0;
    // Ids strictly increase; the broker never repeats one, but a client must not trust a
    // replayed frame to be new (a proxy retrying, a bug): once seen, never applied twice.
    if (id > 0 && id <= this.lastEventId) return;
    if (id > 0) this.lastEventId = id;
    this._attempt = 0; // events flow again: the next outage starts with a short delay
    this._armHeartbeat();
    const event = {
      id,
      type: message.type,
      data: parseJson(message.data),
      raw: message.data,
      receivedAt: now(),
    };
    this.stats.events += 1;
    this.stats.bytes += frameBytes(event);
    this._emit("onEvent", event);
    this._dispatch(event);
  }

  _dispatch(event) {
    const data = event.data || {};
    if (event.type === "token") {
      this.stats.tokens += Number(data.tokens) || 0;
      if (this.stats.timeToFirstTokenMs === null) {
        this.stats.timeToFirstTokenMs = Math.round(event.receivedAt - this.stats.startedAt);
      }
      this._queueToken(typeof data.text === "string" ? data.text : "", event);
      return;
    }
    this._flushTokens(); // handlers see events in order: pending text first
    if (event.type === "metadata") this._emit("onMetadata", data, event);
    else if (event.type === "progress") this._emit("onProgress", data, event);
    else if (event.type === "tool_call") this._emit("onToolCall", data, event);
    else if (event.type === "done") this._finish(() => this._emit("onDone", data, event));
    else if (event.type === "error") {
      const error = new StreamError(data.code || "error", data.message || "the stream failed", {
        retryable: Boolean(data.retryable),
        data,
      });
      this._finish(() => this._emit("onError", error, event));
    }
  }

  /** A terminal event: close first (the server ends the response; EventSource would retry). */
  _finish(report) {
    this.ended = true;
    this._close();
    report();
    this._setState(States.CLOSED, "ended");
  }

  _fail(error) {
    this.ended = true;
    this._close();
    this._emit("onError", error, null);
    this._setState(States.CLOSED, error.code);
  }

  _queueToken(text, event) {
    const pending = this._pending;
    pending.text += text;
    pending.last = event;
    if (!this.options.batchTokens) {
      this._flushTokens();
      return;
    }
    if (pending.frame !== null || pending.timer !== null) return;
    const flush = () => this._flushTokens();
    if (typeof requestAnimationFrame === "function") pending.frame = requestAnimationFrame(flush);
    // requestAnimationFrame does not run in a hidden tab; the timer keeps the text current.
    pending.timer = setTimeout(flush, this.options.hiddenFlushMs);
  }

  _flushTokens() {
    const pending = this._pending;
    const { text, last } = pending;
    this._dropPendingTokens();
    if (last !== null) this._emit("onToken", text, last);
  }

  _dropPendingTokens() {
    const pending = this._pending;
    if (pending.frame !== null) cancelAnimationFrame(pending.frame);
    clearTimeout(pending.timer);
    pending.frame = null;
    pending.timer = null;
    pending.text = "";
    pending.last = null;
  }

  _close() {
    clearTimeout(this._heartbeat);
    clearTimeout(this._retry);
    this._heartbeat = null;
    this._retry = null;
    if (this._source !== null) this._source.close();
    this._source = null;
  }

  _setState(state, reason) {
    if (state === this.state) return;
    this.state = state;
    this._emit("onStateChange", state, { reason });
  }

  _emit(name, ...args) {
    if (this._stopped && name !== "onStateChange") return;
    const handler = this.handlers[name];
    if (typeof handler !== "function") return;
    try {
      handler(...args);
    } catch (error) {
      // A failing handler must not break delivery to the others; surface it, do not hide it.
      reportError(error);
    }
  }
}

/**
 * Watch a stream: `new StreamWatcher(target, handlers, options).start()`.
 * @param {string|URL|WatchTarget} target
 * @param {Handlers} [handlers]
 * @param {WatchOptions} [options]
 * @returns {StreamWatcher}
 */
export function watch(target, handlers = {}, options = {}) {
  return new StreamWatcher(target, handlers, options).start();
}

function now() {
  return globalThis.performance ? performance.now() : Date.now();
}

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

/** Approximate: `data` counted in UTF-16 units, plus the `id:` / `event:` lines. */
function frameBytes(event) {
  return event.raw.length + event.type.length + String(event.id).length + 20;
}

function retryAfterMs(response) {
  const seconds = Number(response.headers.get("retry-after"));
  return Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : 0;
}

function reportError(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else setTimeout(() => { throw error; });
}
