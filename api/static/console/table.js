// The streams table: `GET /v1/streams`, newest first, polled every second while the tab is
// visible. Rows are keyed by stream id and updated in place, so polling does not flicker,
// lose hover or focus, or reset the scroll position.

import { h, select, setText } from "./dom.js";
import { DASH, ago, clock, duration, integer, rate, shortId } from "./format.js";

const PAGE = 50;
const POLL_MS = 1000;
const MAX_POLL_MS = 10_000;
const STATUSES = ["queued", "running", "completed", "failed", "cancelled"];

const COLUMNS = [
  ["id", "ID", "the stream id (its random tail; hover for the whole id)"],
  ["status", "Status", ""],
  ["model", "Model", ""],
  ["tenant", "Tenant", "the API key's tenant; — when auth is off"],
  ["created", "Created", ""],
  ["ttft", "TTFT", "time to first token: creation → first token in the log"],
  ["rate", "Tok/s", "tokens per second, first token → end"],
  ["tokens", "Tokens", "completion tokens (known once the stream ended)"],
  ["viewers", "Viewers", "event connections opened on the stream (reconnects included)"],
  ["duration", "Duration", "worker start → end; running streams count up"],
];

export class StreamsTable {
  /**
   * @param {import("./console.js").Context} ctx
   * @param {URLSearchParams} params the hash's query: status, model, meta (`key=value`)
   */
  constructor(ctx, params) {
    this.ctx = ctx;
    this.filters = {
      status: params.get("status") || "",
      model: params.get("model") || "",
      meta: params.get("meta") || "",
    };
    this.first = null; // the latest poll of the first page
    this.older = []; // rows loaded with "load more", below the first page
    this.cursor = null;
    this.rows = new Map(); // id -> {row: <tr>, cells: {column: <td>}}
    this.rendered = false;
    this.paused = false;
    this.timer = null;
    this.pollSeq = 0;
    this.stopped = false;
    this.failures = 0;
    this.lastUpdate = null;
    this.onVisibility = () => {
      if (!document.hidden) this.poll();
      else this.showLive();
    };
  }

  mount(container) {
    this.element = this.build();
    container.replaceChildren(this.element);
    document.addEventListener("visibilitychange", this.onVisibility);
    this.loadModels();
    this.poll();
  }

  unmount() {
    this.stopped = true;
    clearTimeout(this.timer);
    document.removeEventListener("visibilitychange", this.onVisibility);
    this.ctx.notices.clear("table");
  }

  build() {
    this.statusFilter = select(
      { "aria-label": "Status filter", dataset: { role: "filter-status" }, onchange: () => this.filterChanged() },
      [["", "any status"], ...STATUSES],
      this.filters.status,
    );
    this.modelFilter = select(
      { "aria-label": "Model filter", dataset: { role: "filter-model" }, onchange: () => this.filterChanged() },
      [["", "any model"], ...(this.filters.model ? [this.filters.model] : [])],
      this.filters.model,
    );
    this.metaFilter = h("input", {
      type: "search",
      placeholder: "metadata key=value",
      "aria-label": "Metadata filter",
      value: this.filters.meta,
      dataset: { role: "filter-meta" },
      onchange: () => this.filterChanged(),
    });
    this.live = h("span", { class: "live", dataset: { role: "live" } });
    this.pauseButton = h("button", { type: "button", class: "button", onclick: () => this.togglePause() }, "Pause");
    this.body = h("tbody", { dataset: { role: "rows" }, onclick: (e) => this.open(e), onkeydown: (e) => this.openByKey(e) });
    this.state = h("div", { class: "table-state", dataset: { role: "table-state" }, hidden: true });
    this.count = h("span", { class: "muted", dataset: { role: "count" } });
    this.tiles = this.buildTiles();
    this.more = h("button", { type: "button", class: "button", dataset: { role: "load-more" }, onclick: () => this.loadMore() }, "Load more");
    return h(
      "section",
      { class: "view view-streams", dataset: { view: "streams" } },
      h(
        "div",
        { class: "toolbar" },
        h("h1", null, "Streams"),
        h("div", { class: "filters" }, this.statusFilter, this.modelFilter, this.metaFilter),
        h("div", { class: "spacer" }),
        this.live,
        this.pauseButton,
        h("a", { class: "button primary", href: "#/new" }, "New generation"),
      ),
      this.tiles.element,
      h(
        "div",
        { class: "panel table-panel" },
        h(
          "table",
          { class: "streams" },
          h("thead", null, h("tr", null, COLUMNS.map(([key, label, title]) => h("th", { class: `col-${key}`, title: title || false }, label)))),
          this.body,
        ),
        this.state,
      ),
      h("div", { class: "table-footer" }, this.count, this.more),
    );
  }

  /** Counts by status over the rows shown (a click filters by it), and the median TTFT. */
  buildTiles() {
    const values = {};
    const tile = (key, label, attrs) => {
      values[key] = h("span", { class: "tile-value" }, DASH);
      return h("button", { type: "button", class: "tile", ...attrs }, h("span", { class: "tile-label" }, label), values[key]);
    };
    const statusTiles = STATUSES.map((status) =>
      tile(status, status, {
        class: `tile status-${status}`,
        dataset: { status },
        title: `show only ${status} streams (again: all)`,
        onclick: () => {
          this.statusFilter.value = this.filters.status === status ? "" : status;
          this.filterChanged();
        },
      }),
    );
    const ttft = tile("ttft", "median TTFT", { title: "over the rows shown", disabled: true });
    return { element: h("div", { class: "tiles", dataset: { role: "tiles" } }, statusTiles, ttft), values, statusTiles };
  }

  renderTiles(streams) {
    const { values, statusTiles } = this.tiles;
    for (const status of STATUSES) setText(values[status], integer(streams.filter((s) => s.status === status).length));
    for (const element of statusTiles) element.classList.toggle("active", element.dataset.status === this.filters.status);
    const ttfts = streams.map((s) => s.time_to_first_token_ms).filter((v) => v !== null).sort((a, b) => a - b);
    setText(values.ttft, ttfts.length ? `${integer(ttfts[Math.floor((ttfts.length - 1) / 2)])} ms` : DASH);
  }

  async loadModels() {
    try {
      const answer = await this.ctx.api.models();
      const known = new Set([...this.modelFilter.options].map((o) => o.value));
      for (const model of answer.data) {
        if (!known.has(model.id)) this.modelFilter.append(h("option", { value: model.id }, model.id));
      }
    } catch {
      // The listing reports auth and availability problems; the filter just stays short.
    }
  }

  query(extra = {}) {
    const query = { limit: PAGE, status: this.filters.status, model: this.filters.model, ...extra };
    const [key, ...rest] = this.filters.meta.split("=");
    if (key.trim() && rest.length) query[`metadata.${key.trim()}`] = rest.join("=").trim();
    return query;
  }

  filterChanged() {
    this.filters = { status: this.statusFilter.value, model: this.modelFilter.value, meta: this.metaFilter.value.trim() };
    const params = new URLSearchParams(Object.entries(this.filters).filter(([, v]) => v));
    const search = params.toString();
    // replaceState: a filter is not a new page for the back button, and no re-mount.
    history.replaceState(null, "", `#/streams${search ? `?${search}` : ""}`);
    this.first = null;
    this.older = [];
    this.cursor = null;
    this.rendered = false;
    this.poll();
  }

  togglePause() {
    this.paused = !this.paused;
    setText(this.pauseButton, this.paused ? "Resume" : "Pause");
    if (!this.paused) this.poll();
    else this.showLive();
  }

  async poll() {
    clearTimeout(this.timer);
    if (this.stopped || this.paused || document.hidden) return this.showLive();
    const seq = ++this.pollSeq;
    let delay = POLL_MS;
    try {
      const page = await this.ctx.api.listStreams(this.query());
      if (seq !== this.pollSeq || this.stopped) return;
      this.first = page;
      if (!this.older.length) this.cursor = page.next_cursor;
      this.failures = 0;
      this.lastUpdate = Date.now();
      this.ctx.notices.clear("table");
      this.render();
    } catch (error) {
      if (seq !== this.pollSeq || this.stopped) return;
      this.failures += 1;
      if (error.needsKey) {
        this.showAuthNeeded(error);
        return; // nothing to poll for until a key is entered (that re-mounts the view)
      }
      this.ctx.notices.error("table", error, "listing streams");
      delay = Math.min(MAX_POLL_MS, POLL_MS * 2 ** this.failures);
    }
    this.showLive();
    this.timer = setTimeout(() => this.poll(), delay);
  }

  async loadMore() {
    if (!this.cursor) return;
    this.more.disabled = true;
    try {
      const page = await this.ctx.api.listStreams(this.query({ cursor: this.cursor }));
      this.older.push(...page.data);
      this.cursor = page.next_cursor;
      this.render();
    } catch (error) {
      this.ctx.notices.error("table", error, "loading more streams");
    } finally {
      this.more.disabled = !this.cursor;
    }
  }

  merged() {
    const first = this.first ? this.first.data : [];
    const seen = new Set(first.map((s) => s.id));
    return [...first, ...this.older.filter((s) => !seen.has(s.id))];
  }

  render() {
    const streams = this.merged();
    const now = Date.now();
    const keep = new Set();
    let previous = null;
    for (const stream of streams) {
      keep.add(stream.id);
      let entry = this.rows.get(stream.id);
      if (!entry) {
        entry = this.newRow(stream);
        this.rows.set(stream.id, entry);
        // Highlight arrivals, not the first paint of the table (or of a new filter).
        if (this.rendered) entry.row.classList.add("row-new");
      }
      this.fill(entry, stream, now);
      const { row } = entry;
      const expected = previous ? previous.nextSibling : this.body.firstChild;
      if (row !== expected) this.body.insertBefore(row, expected);
      previous = row;
    }
    for (const [id, { row }] of this.rows) {
      if (!keep.has(id)) {
        row.remove();
        this.rows.delete(id);
      }
    }
    this.rendered = true;
    this.renderTiles(streams);
    this.state.hidden = streams.length > 0;
    if (!streams.length) this.showEmpty();
    setText(this.count, `${streams.length} stream${streams.length === 1 ? "" : "s"} shown`);
    this.more.disabled = !this.cursor;
    setText(this.more, this.cursor ? "Load more" : "End of list");
  }

  newRow(stream) {
    const cells = {};
    const row = h(
      "tr",
      {
        tabindex: 0,
        dataset: { id: stream.id },
        title: `Open ${stream.id}`,
        // Once played, drop the class: a row moved later would otherwise flash again.
        onanimationend: () => row.classList.remove("row-new"),
      },
      COLUMNS.map(([key]) => (cells[key] = h("td", { class: `col-${key}` }))),
    );
    cells.id.append(h("a", { href: `#/streams/${stream.id}`, class: "mono", title: stream.id }, shortId(stream.id)));
    cells.status.append(h("span", { class: "badge" }));
    return { row, cells };
  }

  fill({ row, cells }, stream, now) {
    const badge = cells.status.firstChild;
    badge.className = `badge status-${stream.status}`;
    setText(badge, stream.status);
    row.dataset.status = stream.status;
    setText(cells.model, stream.model);
    setText(cells.tenant, stream.tenant || DASH);
    setText(cells.created, ago(stream.created_at, now));
    cells.created.title = `${clock(stream.created_at)} (${stream.created_at})`;
    setText(cells.ttft, stream.time_to_first_token_ms === null ? DASH : `${integer(stream.time_to_first_token_ms)} ms`);
    setText(cells.rate, rate(stream.tokens_per_second));
    setText(cells.tokens, integer(stream.usage ? stream.usage.completion_tokens : null));
    setText(cells.viewers, integer(stream.connections));
    const running = stream.duration_ms === null && stream.started_at;
    const ms = running ? now - Date.parse(stream.started_at) : stream.duration_ms;
    setText(cells.duration, running ? `${duration(Math.max(0, ms))} …` : duration(ms));
  }

  showEmpty() {
    const filtered = this.filters.status || this.filters.model || this.filters.meta;
    this.state.className = "table-state";
    this.state.replaceChildren(
      h("p", null, filtered ? "No stream matches these filters." : "No streams yet."),
      h("a", { class: "button primary", href: "#/new" }, "Create a test generation"),
    );
  }

  showAuthNeeded(error) {
    for (const { row } of this.rows.values()) row.remove();
    this.rows.clear();
    this.first = null;
    this.older = [];
    this.state.hidden = false;
    this.state.className = "table-state table-state-auth";
    this.state.dataset.code = error.code;
    const link = this.ctx.session.linkStream;
    this.state.replaceChildren(
      h("p", { class: "state-title" }, "Enter an API key to list streams"),
      h("p", { class: "muted" }, `The broker answered ${error.status} ${error.code}: ${error.message}`),
      link ? h("p", null, "This page was opened with a read token for one stream: ", h("a", { href: `#/streams/${link}` }, `open ${shortId(link)}`)) : null,
      h("button", { type: "button", class: "button primary", onclick: () => this.ctx.focusKey() }, "Enter API key"),
    );
    setText(this.count, "");
    this.more.disabled = true;
    setText(this.live, "● locked");
    this.live.className = "live live-off";
  }

  showLive() {
    if (this.stopped || !this.live) return;
    let text = "● live";
    let off = false;
    if (this.paused) [text, off] = ["❚❚ paused", true];
    else if (document.hidden) [text, off] = ["❚❚ tab hidden", true];
    else if (this.failures) [text, off] = ["● retrying", true];
    this.live.className = `live${off ? " live-off" : ""}`;
    setText(this.live, text);
    if (this.lastUpdate) this.live.title = `updated ${new Date(this.lastUpdate).toLocaleTimeString()}`;
  }

  open(event) {
    if (event.target.closest("a")) return; // the id link navigates by itself
    const row = event.target.closest("tr[data-id]");
    if (row) this.ctx.navigate(`#/streams/${row.dataset.id}`);
  }

  openByKey(event) {
    if (event.key !== "Enter") return;
    const row = event.target.closest("tr[data-id]");
    if (row) this.ctx.navigate(`#/streams/${row.dataset.id}`);
  }
}
