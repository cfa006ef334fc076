/**
 * streambroker.js: the browser client of streambroker's event streams. One dependency-free
 * ES module, served by the api at `/static/streambroker.js`; any page may import it.
 *
 *     import { createAndWatch } from "/static/streambroker.js";
 *     const watcher = await createAndWatch(
 *       { model: "fake", messages: [{ role: "user", content: "Hello" }], max_tokens: 50 },
 *       { onToken: (text) => answer.append(text), onDone: (done) => show(done.finish_reason) },
 *       { apiKey }, // only when the broker has auth on
 *     );
 *     stopButton.onclick = () => watcher.cancel(); // the stream ends with done / cancelled
 *
 * It is a layer over the browser's EventSource, which resumes by itself after a dropped
 * connection with the `Last-Event-ID` header (the broker then sends every later event exactly
 * once). What EventSource does not do, this module adds:
 *
 * - A terminal event (`done`, or the SSE event named `error`) ends the watch for good. The
 *   broker ends the response after it; a bare EventSource would reconnect and get 204.
 *   The event named `error` (a MessageEvent with data) and a connection error (a plain Event)
 *   arrive on the same listener; they are told apart by type.
 * - Its own reconnection, with exponential backoff and jitter, where EventSource gives up or
 *   retries without backing off. See "How a watch goes on after a failure" below.
 * - A heartbeat timeout. The watcher asks for `?heartbeat=event`: the broker then sends its
 *   heartbeat as an event named `heartbeat` with no id (so the resume point does not move)
 *   instead of the `: ping` comment EventSource hides from scripts. Every event and every
 *   heartbeat re-arms a deadline; a connection silent past `heartbeatTimeoutMs` is dead (a
 *   NAT or proxy that forgot it: no error ever comes) and is replaced. The broker beats every
 *   `BROKER_HEARTBEAT_SECONDS` (15 s by default, announced in `x-heartbeat-seconds`, which
 *   EventSource cannot read), so the default is twice that plus 5 s; set the option to
 *   2 × the server's period + a margin when it differs. A quiet-but-alive stream (a model
 *   that thinks for minutes) is never reconnected, a dead one always is.
 * - Tokens are delivered at most once per animation frame, concatenated: a fast stream costs
 *   one re-render per frame, not one per token event (`stats.flushes` vs `stats.tokenEvents`).
 * - `stop()` (close, no reconnect), `cancel()` (ask the broker to end the generation), and
 *   `create()` / `createAndWatch()` for `POST /v1/streams`.
 * - `stats`: connections, reconnects, heartbeat timeouts, events, token events, flushes,
 *   approximate bytes, time to first token.
 *
 * How a watch goes on after a failure, by what EventSource reports on its `error` listener:
 *
 * 1. The connection dropped after it had opened (readyState CONNECTING after an `open`):
 *    EventSource reconnects by itself after the broker's `retry:`, sending `Last-Event-ID`.
 *    Nothing to do but report `reconnecting` (and keep the heartbeat deadline armed, in case
 *    that reconnect hangs).
 * 2. An attempt failed before any answer (CONNECTING with no `open` since the last failure:
 *    refused, reset, DNS): EventSource would retry at the same `retry:` forever, a server that
 *    is down would be hammered by every open tab. The watcher closes it and reconnects itself
 *    with backoff, resuming with `?last_event_id=` (a new EventSource cannot send the header).
 * 3. EventSource gave up (CLOSED): any answer but a 200 `text/event-stream` (204, 4xx, 5xx,
 *    a proxy's HTML page) and, in Chromium, a response cut inside its head. It does not expose
 *    the status, so the watcher asks the *same events URL* once with fetch() (the probe) and
 *    reads the status and the broker's JSON error: 204 ends the watch (the stream ended at or
 *    before the resume point; its end is reported from the state); 408/425/429/5xx, a network
 *    error or a 200 back off and reconnect (`Retry-After` honoured); any other refusal (400,
 *    401 `invalid_token`, 403, 404, 410 `log_lost`) ends the watch with `onError`.
 *    Why the events URL and not the cheaper state (`GET /v1/streams/{id}`)? The probe gets
 *    exactly the answer EventSource got: same route, resume point and token. The state would
 *    answer 200 where the events URL answers 410 (resume point past the log), 400 (a bad
 *    parameter) or 429 (the tenant's connection limit), and a proxy may fail one path and not
 *    the other; guessing from it would loop on a final refusal or stop on a transient one.
 *    The cost, on this rare path only: when the probe gets a 200 it drops that stream at once
 *    (one more connection in the stream's `connections`).
 * 4. Silence past `heartbeatTimeoutMs` (see above): close and reconnect at once.
 *
 * Auth: with auth on, EventSource cannot send an `Authorization` header, so a browser reads a
 * stream with a read token (`?token=`): the create answer carries one, and `readToken()` gets
 * one for an existing stream with the tenant's API key. The API key itself is only ever sent
 * in a header (create, cancel, state), never in a URL.
 *
 * Limits: EventSource only delivers named events it has listeners for, so an event type added
 * to the broker later is not seen until this module knows it.
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

/** The event types the broker sends (docs/http.md, "Event types"). */
export const EVENT_TYPES = Object.freeze(["metadata", "token", "tool_call", "progress", "resumed", "done", "error"]);

/** The heartbeat event of `?heartbeat=event`: `data: {}`, no id. */
const HEARTBEAT = "heartbeat";

/** HTTP statuses worth retrying (with every 5xx): the broker is busy or briefly unreachable. */
const TRANSIENT_STATUSES = new Set([408, 425, 429]);

const DEFAULT_OPTIONS = Object.freeze({
  /** 2 × the broker's default heartbeat (15 s) + 5 s. */
  heartbeatTimeoutMs: 35_000,
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
 * @property {string} [baseUrl] the broker's origin (and path prefix); default: this page's
 * @property {string|null} [token] a read token (`?token=`), needed when the broker has auth on
 * @property {string|null} [apiKey] the tenant's API key, sent as a header by `cancel()` and
 *   `getState()` only (EventSource cannot send it: watching needs `token`)
 * @property {number} [lastEventId] resume after this event id; 0 (default) = from the beginning
 * @property {number|null} [replay] replay recorded events at this speed (1 = as recorded)
 */

/**
 * One event as received: what `onEvent` gets, and the second argument of the typed handlers.
 * @typedef {object} RawEvent
 * @property {number} id the SSE id (dense: 1, 2, 3...)
 * @property {string} type `metadata`, `token`, `tool_call`, `progress`, `resumed`, `done` or
 *   `error`
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
 * @property {(resumed: object, event: RawEvent) => void} [onResumed] another worker went on
 *   with the answer (`attempt`, `after_event_id`, `reason`: `worker_lost` or
 *   `worker_stopped`). No text and not an end: `onToken` goes on with the same answer
 * @property {(metadata: object, event: RawEvent) => void} [onMetadata] the first event
 * @property {(done: object, event: RawEvent|null) => void} [onDone] terminal: `finish_reason`
 *   (`cancelled` after a cancel), `usage`; `event` is null when the stream had ended before
 *   the resume point (the values then come from the stream's state)
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
 * @property {number} [heartbeatTimeoutMs] reconnect after this long without an event or a
 *   heartbeat (35 s: twice the broker's default heartbeat, plus 5 s)
 * @property {number} [minBackoffMs] first reconnect delay of the watcher's own (0.5 s)
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
    const retryable = response.status >= 500 || TRANSIENT_STATUSES.has(response.status);
    return new StreamError(code, message, { kind: "http", status: response.status, retryable });
  }
}

/** One JSON request to the broker; a refusal or a network failure throws a StreamError. */
async function request(method, url, { apiKey = null, body = undefined, signal = undefined } = {}) {
  const headers = { Accept: "application/json" };
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      signal,
    });
  } catch {
    throw new StreamError("network_error", "the broker did not answer (network error or server down)", {
      kind: "http",
      status: 0,
      retryable: true,
    });
  }
  if (!response.ok) throw await StreamError.fromResponse(response);
  return response.status === 204 ? null : response.json();
}

const streamPath = (baseUrl, streamId) => `${baseUrl || ""}/v1/streams/${encodeURIComponent(streamId)}`;

/**
 * Create a generation: `POST /v1/streams` with `body` (OpenAI chat shape: `model`,
 * `messages`, `max_tokens`, `metadata`, `fake`, ...). Resolves with the broker's answer:
 * `id`, `status`, `events_url`, and `read_token` when auth is on.
 * @param {object} body
 * @param {{baseUrl?: string, apiKey?: string|null}} [where]
 * @returns {Promise<{id: string, read_token?: string|null, events_url: string}>}
 */
export function create(body, { baseUrl = "", apiKey = null } = {}) {
  return request("POST", `${baseUrl}/v1/streams`, { apiKey, body });
}

/**
 * Create a generation and watch it (with the read token of the create answer, if any).
 * `options` are a watch's (`WatchOptions`) plus `baseUrl` and `apiKey`; the key stays
 * with the watcher for `cancel()`. The create answer is `watcher.stream`.
 * @param {object} body
 * @param {Handlers} [handlers]
 * @param {WatchOptions & {baseUrl?: string, apiKey?: string|null}} [options]
 * @returns {Promise<StreamWatcher>}
 */
export async function createAndWatch(body, handlers = {}, { baseUrl = "", apiKey = null, ...options } = {}) {
  const stream = await create(body, { baseUrl, apiKey });
  const target = { streamId: stream.id, baseUrl, apiKey, token: stream.read_token ?? null };
  const watcher = new StreamWatcher(target, handlers, options);
  watcher.stream = stream;
  return watcher.start();
}

/**
 * Get a read token for one stream with the tenant's API key (`POST .../read_token`).
 * Answers `{read_token: null}` when the broker has auth off (no token needed).
 * @param {{baseUrl?: string, streamId: string, apiKey?: string|null}} args
 * @returns {Promise<{read_token: string|null, expires_at: string|null}>}
 */
export function readToken({ baseUrl = "", streamId, apiKey = null }) {
  return request("POST", `${streamPath(baseUrl, streamId)}/read_token`, { apiKey });
}

/**
 * A stream's state (`GET /v1/streams/{id}`: `status`, `text`, `usage`, ...), with the
 * target's read token or API key.
 * @param {string|URL|WatchTarget} target
 */
export function getState(target) {
  const resolved = resolveTarget(target);
  return request("GET", stateUrl(resolved), { apiKey: resolved.apiKey });
}

/**
 * Ask the broker to end a generation (`POST .../cancel`, with the target's API key when auth
 * is on; a read token cannot cancel). Resolves with the state at that moment; watchers of the
 * stream then receive `done` with `finish_reason: "cancelled"`.
 * @param {string|URL|WatchTarget} target
 */
export function cancel(target) {
  const { baseUrl, streamId, apiKey } = resolveTarget(target);
  return request("POST", `${streamPath(baseUrl, streamId)}/cancel`, { apiKey });
}

/**
 * The events URL of a target, resuming after `lastEventId`, with heartbeats as events.
 * @param {WatchTarget} target
 * @param {number} [lastEventId]
 */
export function eventsUrl(target, lastEventId = target.lastEventId || 0) {
  const params = new URLSearchParams();
  if (target.token) params.set("token", target.token);
  if (target.replay != null) params.set("replay", String(target.replay));
  if (lastEventId > 0) params.set("last_event_id", String(lastEventId));
  params.set("heartbeat", "event");
  return `${streamPath(target.baseUrl, target.streamId)}/events?${params}`;
}

/** The state URL (`GET /v1/streams/{id}`) of a target, with its token. */
export function stateUrl(target) {
  const query = target.token ? `?token=${encodeURIComponent(target.token)}` : "";
  return `${streamPath(target.baseUrl, target.streamId)}${query}`;
}

/**
 * @param {string|URL|WatchTarget} target
 * @returns {WatchTarget}
 */
export function resolveTarget(target) {
  if (typeof target !== "string" && !(target instanceof URL)) {
    if (!target || typeof target.streamId !== "string" || !target.streamId) {
      throw new TypeError("give an events URL or {streamId, ...}");
    }
    return { baseUrl: "", token: null, apiKey: null, lastEventId: 0, replay: null, ...target };
  }
  const url = new URL(String(target), globalThis.location ? globalThis.location.href : undefined);
  const match = url.pathname.match(/^(.*)\/v1\/streams\/([^/]+)\/events$/);
  if (!match) throw new TypeError(`not an events URL: ${url.pathname}`);
  const replay = url.searchParams.get("replay");
  return {
    baseUrl: url.origin + match[1],
    streamId: decodeURIComponent(match[2]),
    token: url.searchParams.get("token"),
    apiKey: null,
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
    /** The create answer, when made by `createAndWatch()`. */
    this.stream = null;
    this.stats = {
      /** Connections that opened (a 200 event stream). */
      connects: 0,
      /** New connections after the first: EventSource's own, and the watcher's. */
      reconnects: 0,
      connectionErrors: 0,
      heartbeatTimeouts: 0,
      heartbeats: 0,
      /** Broker events received (heartbeats not included), each id once. */
      events: 0,
      tokenEvents: 0,
      /** Tokens, as the events count them (`data.tokens`). */
      tokens: 0,
      /** `onToken` calls: one per animation frame at most, whatever the token events. */
      flushes: 0,
      /** Approximate bytes of the frames received (the data, ids and field names). */
      bytes: 0,
      /** ms from `start()` to the first token event, null until then. */
      timeToFirstTokenMs: null,
      startedAt: null,
    };
    this._source = null;
    this._opened = false; // the current EventSource opened since its last failure
    this._stopped = false;
    this._attempt = 0;
    this._heartbeat = null;
    this._retry = null;
    this._pending = { text: "", last: null, frame: null, timer: null };
    this._onOnline = () => this._reconnectNow();
  }

  /** Open the connection (once). @returns {this} */
  start() {
    if (this.stats.startedAt !== null) return this;
    this.stats.startedAt = now();
    globalThis.addEventListener?.("online", this._onOnline);
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

  /**
   * Ask the broker to end the generation (with the target's `apiKey`). The watch goes on
   * until the `done` / `cancelled` event, so the text shown is exactly what was generated.
   * @returns {Promise<object>} the stream's state as the broker answered
   */
  cancel() {
    return cancel(this.target);
  }

  _live() {
    return !this._stopped && !this.ended;
  }

  _open(state, reason) {
    this._setState(state, reason);
    const source = new EventSource(eventsUrl(this.target, this.lastEventId));
    this._source = source;
    this._opened = false;
    source.addEventListener("open", () => this._onOpen(source));
    for (const type of EVENT_TYPES) {
      if (type !== "error") source.addEventListener(type, (event) => this._onFrame(source, event));
    }
    source.addEventListener(HEARTBEAT, () => this._onHeartbeat(source));
    // One listener gets both the SSE event named "error" and connection errors.
    source.addEventListener("error", (event) => this._onErrorEvent(source, event));
    this._armHeartbeat(); // also bounds a connection attempt that hangs
  }

  _onOpen(source) {
    if (source !== this._source) return;
    this._opened = true;
    this._attempt = 0; // the broker answers: the next outage starts with a short delay
    this.stats.connects += 1;
    this._setState(States.OPEN, "open");
    this._armHeartbeat();
  }

  _onHeartbeat(source) {
    if (source !== this._source || !this._live()) return;
    this.stats.heartbeats += 1;
    this.stats.bytes += 34; // "event: heartbeat\ndata: {}\n\n"
    this._armHeartbeat();
  }

  _onErrorEvent(source, event) {
    if (source !== this._source) return;
    if (event instanceof MessageEvent) {
      this._onFrame(source, event); // the generation's terminal `error` event
      return;
    }
    this.stats.connectionErrors += 1;
    const readyState = source.readyState;
    if (readyState === EventSource.CONNECTING && this._opened) {
      // 1. Dropped after it opened: EventSource comes back after `retry:` with Last-Event-ID.
      this._opened = false;
      this.stats.reconnects += 1;
      this._setState(States.RECONNECTING, "connection lost");
      this._armHeartbeat();
      return;
    }
    this._close();
    if (readyState === EventSource.CONNECTING) {
      this._scheduleReconnect("network error"); // 2. No answer at all: back off
    } else {
      this._setState(States.RECONNECTING, "connection refused");
      this._probe(); // 3. EventSource gave up: learn why
    }
  }

  /** Ask the events URL once with fetch() to learn what EventSource could not tell us. */
  async _probe() {
    const controller = new AbortController();
    // No heartbeat is armed meanwhile: a probe that hangs (a stalled proxy) must not stall
    // the watch, so it gets as long as a silent connection would.
    const deadline = setTimeout(() => controller.abort(), this.options.heartbeatTimeoutMs);
    let response;
    let error = null;
    try {
      response = await fetch(eventsUrl(this.target, this.lastEventId), {
        headers: { Accept: "text/event-stream" },
        cache: "no-store",
        signal: controller.signal,
      });
      if (response.ok) controller.abort(); // only the status was wanted, not the stream
      else error = await StreamError.fromResponse(response); // its body is small JSON
    } catch {
      response = null;
    } finally {
      clearTimeout(deadline);
    }
    if (!this._live()) return;
    if (response === null) this._scheduleReconnect("network error");
    else if (response.status === 204) await this._endFromState(); // ended before our resume point
    else if (response.ok) this._scheduleReconnect("retrying"); // it answers again (or a proxy's page did)
    else if (error.retryable) this._scheduleReconnect(error.code, retryAfterMs(response));
    else this._fail(error);
  }

  /** A stream that had ended before our resume point: report its end from its state. */
  async _endFromState() {
    let state = null;
    try {
      const { baseUrl, streamId, token, apiKey } = this.target;
      const signal = AbortSignal.timeout?.(this.options.heartbeatTimeoutMs);
      state = await request("GET", stateUrl({ baseUrl, streamId, token }), { apiKey, signal });
    } catch {
      // The end itself is certain (204); only its details are missing.
    }
    if (!this._live()) return;
    this._flushTokens();
    if (state && state.status === "failed" && state.error) {
      const { code, message, retryable } = state.error;
      const error = new StreamError(code, message, { retryable, data: state.error });
      this._finish(() => this._emit("onError", error, null));
    } else {
      const done = { finish_reason: state ? state.finish_reason : null, usage: state ? state.usage : null };
      this._finish(() => this._emit("onDone", done, null));
    }
  }

  _scheduleReconnect(reason, atLeastMs = 0) {
    const { minBackoffMs, maxBackoffMs } = this.options;
    const ceiling = Math.min(maxBackoffMs, minBackoffMs * 2 ** Math.min(this._attempt, 20));
    this._attempt += 1;
    // Jitter over the upper half: many tabs cut by one outage do not come back in step.
    const delay = Math.max(atLeastMs, ceiling / 2 + Math.random() * (ceiling / 2));
    this.stats.reconnects += 1;
    this._setState(States.RECONNECTING, reason);
    clearTimeout(this._retry);
    this._retry = setTimeout(() => {
      this._retry = null;
      if (this._live()) this._open(States.RECONNECTING, reason);
    }, delay);
  }

  /** The browser is back online: a reconnect waiting out its backoff goes now. */
  _reconnectNow() {
    if (this._retry === null || !this._live()) return;
    clearTimeout(this._retry);
    this._retry = null;
    this._open(States.RECONNECTING, "online");
  }

  _armHeartbeat() {
    clearTimeout(this._heartbeat);
    this._heartbeat = setTimeout(() => this._onSilence(), this.options.heartbeatTimeoutMs);
  }

  _onSilence() {
    this._heartbeat = null;
    if (!this._live() || this._source === null) return;
    this.stats.heartbeatTimeouts += 1;
    this.stats.reconnects += 1;
    this._close();
    this._open(States.RECONNECTING, "heartbeat timeout");
  }

  _onFrame(source, message) {
    if (source !== this._source || !this._live()) return;
    const id = Number(message.lastEventId) || 0;
    // Ids strictly increase; the broker never repeats one, but a client must not trust a
    // replayed frame to be new (a proxy retrying, a bug): once seen, never applied twice.
    if (id > 0 && id <= this.lastEventId) return;
    if (id > 0) this.lastEventId = id;
    this._attempt = 0;
    this._armHeartbeat();
    const event = { id, type: message.type, data: parseJson(message.data), raw: message.data, receivedAt: now() };
    this.stats.events += 1;
    this.stats.bytes += frameBytes(event);
    this._emit("onEvent", event);
    this._dispatch(event);
  }

  _dispatch(event) {
    const data = event.data || {};
    if (event.type === "token") {
      this.stats.tokenEvents += 1;
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
    else if (event.type === "resumed") this._emit("onResumed", data, event);
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

  /** A terminal event: close first (the broker ends the response; EventSource would retry). */
  _finish(report) {
    this.ended = true;
    this._close();
    report();
    this._setState(States.CLOSED, "ended");
  }

  _fail(error) {
    this._flushTokens();
    this._finish(() => this._emit("onError", error, null));
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
    const { text, last } = this._pending;
    this._dropPendingTokens();
    if (last === null || this._stopped) return;
    this.stats.flushes += 1;
    this._emit("onToken", text, last);
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

  /** Close the connection and every timer; with the watch over, forget `online` too. */
  _close() {
    clearTimeout(this._heartbeat);
    clearTimeout(this._retry);
    this._heartbeat = null;
    this._retry = null;
    if (this._source !== null) this._source.close();
    this._source = null;
    this._opened = false;
    if (!this._live()) globalThis.removeEventListener?.("online", this._onOnline);
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
