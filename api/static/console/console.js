// The console's entry point: who we are (API key or read-token link), hash routing between
// the three views, and the notices area. Views get one `Context` and own their own timers.
//
// Routes (in the hash, so a link opens a view directly and the server serves one page):
//   #/streams[?status=&model=&meta=key=value]   the streams table
//   #/streams/<id>[?mode=replay&speed=10]       one stream
//   #/new                                       create a test generation
// A read-token link is /console?stream=<id>&token=<read token> (or #/streams/<id>?token=...).

import { Api, Session } from "./api.js";
import { CreatePanel } from "./create-panel.js";
import { setText } from "./dom.js";
import { shortId } from "./format.js";
import { Notices } from "./notices.js";
import { StreamView } from "./stream-view.js";
import { StreamsTable } from "./table.js";

/**
 * What every view gets.
 * @typedef {object} Context
 * @property {Api} api
 * @property {Session} session
 * @property {Notices} notices
 * @property {(hash: string) => void} navigate
 * @property {() => void} focusKey put the cursor in the API key field
 */

const session = new Session();
const api = new Api(session);
const notices = new Notices(document.getElementById("notices"));
const main = document.getElementById("view");
const keyForm = document.getElementById("auth");
const keyInput = document.getElementById("api-key");
const identity = document.getElementById("identity");

/** @type {Context} */
const ctx = { api, session, notices, navigate, focusKey };
let current = null; // {route, view}

function navigate(hash) {
  if (location.hash === hash) route({ force: true });
  else location.hash = hash;
}

function focusKey() {
  keyInput.focus();
  keyInput.classList.add("attention");
  setTimeout(() => keyInput.classList.remove("attention"), 1200);
}

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/streams";
  const [path, query = ""] = raw.split("?");
  const params = new URLSearchParams(query);
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "streams" && parts[1]) return { name: "stream", id: decodeURIComponent(parts[1]), params };
  if (parts[0] === "new") return { name: "create", params };
  return { name: "streams", params };
}

function route({ force = false } = {}) {
  const next = parseHash();
  if (next.name === "stream" && next.params.get("token")) {
    session.rememberToken(next.id, next.params.get("token"), { fromLink: true });
    showIdentity();
  }
  const same = current && current.route.name === "stream" && next.name === "stream" && current.route.id === next.id;
  if (same && !force) {
    current.route = next;
    current.view.apply(next.params);
    return;
  }
  if (current) current.view.unmount();
  notices.clearAll();
  let view;
  if (next.name === "stream") view = new StreamView(ctx, next.id, next.params);
  else if (next.name === "create") view = new CreatePanel(ctx);
  else view = new StreamsTable(ctx, next.params);
  current = { route: next, view };
  view.mount(main);
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.route === next.name || (link.dataset.route === "streams" && next.name === "stream"));
  }
  document.title = next.name === "stream" ? `${shortId(next.id)} · streambroker` : next.name === "create" ? "New generation · streambroker" : "Streams · streambroker";
}

function showIdentity() {
  identity.className = "identity";
  if (session.apiKey) {
    identity.classList.add("identity-key");
    setText(identity, `API key …${session.apiKey.slice(-4)}`);
  } else if (session.linkStream) {
    identity.classList.add("identity-token");
    setText(identity, `read token · ${shortId(session.linkStream)}`);
  } else {
    setText(identity, "no API key");
  }
  keyForm.querySelector("[data-role=forget]").hidden = !session.apiKey;
}

/** A read-token link: `?stream=<id>&token=<token>` opens that stream, read-only. */
function readLink() {
  const params = new URLSearchParams(location.search);
  const stream = params.get("stream");
  const token = params.get("token");
  if (!stream) return;
  if (token) session.rememberToken(stream, token, { fromLink: true });
  if (!location.hash) history.replaceState(null, "", `${location.pathname}${location.search}#/streams/${stream}`);
}

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  session.setApiKey(keyInput.value);
  keyInput.value = "";
});
keyForm.querySelector("[data-role=forget]").addEventListener("click", () => session.setApiKey(""));
session.addEventListener("change", () => {
  showIdentity();
  route({ force: true }); // every view reloads with the new identity
});
window.addEventListener("hashchange", () => route());

// Errors nobody handled still reach the operator: a console that breaks silently is worse
// than one that says so.
window.addEventListener("unhandledrejection", (event) => {
  const reason = event.reason || {};
  notices.error("unhandled", { code: reason.code || "script_error", message: String(reason.message || reason) });
});

readLink();
showIdentity();
route();
