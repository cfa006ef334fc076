// The console's access to the broker's HTTP API, and who the console is (an API key, or a
// read token for one stream). Every failure becomes an ApiError carrying the broker's own
// code and message (`{"error": {"code", "message"}}`), so views can show it as it is.

import { StreamError, readToken as fetchReadToken } from "/static/streambroker.js";

const KEY_STORAGE = "streambroker.console.apiKey";

export class ApiError extends Error {
  /**
   * @param {number} status HTTP status; 0 when the broker did not answer at all
   * @param {string} code the broker's error code, or `network_error` / `http_<status>`
   * @param {string} message
   * @param {number|null} [retryAfter] seconds, from `Retry-After`
   */
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }

  /** A 401: the view should ask for a key rather than show a generic error. */
  get needsKey() {
    return this.status === 401;
  }

  static async fromResponse(response) {
    let code = `http_${response.status}`;
    let message = response.statusText || "the broker refused the request";
    try {
      const body = await response.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
      }
    } catch {
      // Not the broker's JSON (a proxy in between): keep the status line.
    }
    const retryAfter = Number(response.headers.get("retry-after")) || null;
    return new ApiError(response.status, code, message, retryAfter);
  }
}

/**
 * The console's identity: an API key typed into the page (kept in sessionStorage: this tab
 * only, gone when it closes), and read tokens per stream (from the page URL, from a create
 * answer, or fetched with the key).
 */
export class Session extends EventTarget {
  constructor() {
    super();
    this.apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
    /** @type {Map<string, {token: string|null, expires: number}>} */
    this.tokens = new Map();
    /** The stream a read-token link was opened for, if any. */
    this.linkStream = null;
  }

  setApiKey(key) {
    this.apiKey = key.trim();
    if (this.apiKey) sessionStorage.setItem(KEY_STORAGE, this.apiKey);
    else sessionStorage.removeItem(KEY_STORAGE);
    this.tokens = new Map([...this.tokens].filter(([id]) => id === this.linkStream));
    this.dispatchEvent(new Event("change"));
  }

  /** A read token that came with the page (`?token=&stream=`) or with a create answer. */
  rememberToken(streamId, token, { fromLink = false } = {}) {
    this.tokens.set(streamId, { token, expires: tokenExpiry(token) });
    if (fromLink) this.linkStream = streamId;
  }

  /** Without a key, only the stream of a read-token link can be read. */
  get readOnly() {
    return !this.apiKey && this.linkStream !== null;
  }

  authHeaders() {
    return this.apiKey ? { Authorization: `Bearer ${this.apiKey}` } : {};
  }

  /**
   * The read token to watch `streamId` with, or null when the broker needs none (auth off).
   * A browser EventSource cannot send the API key, so with a key the console asks the broker
   * for a read token (`POST /v1/streams/{id}/read_token`); the key never goes into a URL.
   */
  async tokenFor(streamId) {
    const known = this.tokens.get(streamId);
    if (known && known.expires > Date.now() + 60_000) return known.token;
    if (!this.apiKey && known) return known.token; // an expired link token: let the API say so
    try {
      const answer = await fetchReadToken({ streamId, apiKey: this.apiKey || null });
      this.tokens.set(streamId, {
        token: answer.read_token,
        expires: answer.expires_at ? Date.parse(answer.expires_at) : Infinity,
      });
      return answer.read_token;
    } catch (error) {
      if (error instanceof StreamError) throw new ApiError(error.status, error.code, error.message);
      throw new ApiError(0, "network_error", "the broker did not answer (network error or server down)");
    }
  }
}

/** A read token is `<stream id>.<expiry, epoch s>.<signature>`; its expiry is readable. */
function tokenExpiry(token) {
  const seconds = Number(String(token || "").split(".")[1]);
  return Number.isFinite(seconds) && seconds > 0 ? seconds * 1000 : Infinity;
}

export class Api {
  /** @param {Session} session */
  constructor(session) {
    this.session = session;
  }

  async request(method, path, { query = null, body = undefined, token = null } = {}) {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(query || {})) {
      if (value !== null && value !== undefined && value !== "") params.set(name, String(value));
    }
    // A read token stands in for the key only where the broker accepts one (state, events,
    // export of its stream); elsewhere the key is sent, or nothing (auth off).
    const headers = { Accept: "application/json", ...this.session.authHeaders() };
    if (token && !this.session.apiKey) params.set("token", token);
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const search = params.toString();
    let response;
    try {
      response = await fetch(search ? `${path}?${search}` : path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
      });
    } catch {
      throw new ApiError(0, "network_error", "the broker did not answer (network error or server down)");
    }
    if (!response.ok) throw await ApiError.fromResponse(response);
    return response.status === 204 ? null : response.json();
  }

  listStreams(query) {
    return this.request("GET", "/v1/streams", { query });
  }

  getStream(id, token = null) {
    return this.request("GET", `/v1/streams/${encodeURIComponent(id)}`, { token });
  }

  createStream(body) {
    return this.request("POST", "/v1/streams", { body });
  }

  cancelStream(id) {
    return this.request("POST", `/v1/streams/${encodeURIComponent(id)}/cancel`);
  }

  models() {
    return this.request("GET", "/v1/models");
  }
}
