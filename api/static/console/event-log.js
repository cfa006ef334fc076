// The raw event log of the stream view: id, event, t and data of the last `limit` events,
// written at most once per animation frame (a fast stream sends hundreds of events a
// second), following the tail unless the operator scrolled up to read.

import { h, setText } from "./dom.js";
import { DASH, compactData, integer, seamNote } from "./format.js";

export class EventLog {
  constructor(limit = 500) {
    this.limit = limit;
    this.queue = [];
    this.total = 0;
    this.frame = null;
    this.body = h("tbody", { dataset: { role: "log" } });
    const head = h("tr", null, h("th", { class: "col-id" }, "id"), h("th", { class: "col-event" }, "event"), h("th", { class: "col-t" }, "t (ms)"), h("th", null, "data"));
    this.wrap = h("div", { class: "log-wrap" }, h("table", { class: "log" }, h("thead", null, head), this.body));
    this.count = h("span", { class: "muted" });
    this.element = h(
      "div",
      { class: "panel log-panel" },
      h("div", { class: "panel-title" }, `Events (last ${limit})`, h("div", { class: "spacer" }), this.count),
      this.wrap,
    );
  }

  /** @param {import("/static/streambroker.js").RawEvent} event */
  push(event) {
    this.queue.push(event);
    this.total += 1;
    // In a hidden tab frames do not run: keep only what could be shown.
    if (this.queue.length > this.limit) this.queue.splice(0, this.queue.length - this.limit);
    if (this.frame === null) this.frame = requestAnimationFrame(() => this.flush());
  }

  clear() {
    this.stop();
    this.queue = [];
    this.total = 0;
    this.body.replaceChildren();
    setText(this.count, "");
  }

  stop() {
    if (this.frame !== null) cancelAnimationFrame(this.frame);
    this.frame = null;
  }

  flush() {
    this.frame = null;
    const wrap = this.wrap;
    const atBottom = wrap.scrollTop + wrap.clientHeight >= wrap.scrollHeight - 24;
    this.body.append(...this.queue.map(row));
    this.queue = [];
    while (this.body.childElementCount > this.limit) this.body.firstElementChild.remove();
    const dropped = this.total - this.limit;
    setText(this.count, `${integer(this.total)} received${dropped > 0 ? `, ${integer(dropped)} no longer shown` : ""}`);
    if (atBottom) wrap.scrollTop = wrap.scrollHeight;
  }
}

function row(event) {
  const data = compactData(event.data);
  const t = event.data && event.data.t !== undefined ? event.data.t : DASH;
  return h(
    "tr",
    { class: `ev-${event.type}` },
    h("td", { class: "col-id mono" }, event.id),
    h("td", { class: "col-event" }, h("span", { class: `tag tag-${event.type}` }, event.type)),
    h("td", { class: "col-t mono" }, t),
    h(
      "td",
      { class: "mono data", title: data.length > 120 ? data : false },
      // The seam of a continued answer: worth a marker an operator sees while scrolling.
      event.type === "resumed" ? [h("span", { class: "seam-note", dataset: { role: "seam-note" } }, seamNote(event.data)), " "] : null,
      data,
    ),
  );
}
