// Page-level notices: API errors that are not tied to one form field. Each has a key (the
// source: "table", "state", ...), so an error that repeats every poll updates one notice
// with a count instead of stacking, and goes away when that source succeeds again.

import { h } from "./dom.js";

export class Notices {
  /** @param {HTMLElement} container */
  constructor(container) {
    this.container = container;
    /** @type {Map<string, {element: HTMLElement, count: number, text: string}>} */
    this.shown = new Map();
  }

  /**
   * @param {string} key the source, so repeats replace each other
   * @param {{status?: number, code?: string, message: string}} error
   * @param {string} [context] what was being done ("listing streams")
   */
  error(key, error, context = "") {
    const status = error.status ? `${error.status} ` : "";
    const code = error.code ? `${error.code}` : "error";
    const text = `${context ? `${context}: ` : ""}${status}${code} — ${error.message}`;
    const existing = this.shown.get(key);
    if (existing && existing.text === text) {
      existing.count += 1;
      existing.element.querySelector(".notice-count").textContent = `×${existing.count}`;
      return;
    }
    this.clear(key);
    const element = h(
      "div",
      { class: "notice notice-error", role: "alert", dataset: { key, code } },
      h("span", { class: "notice-code" }, `${status}${code}`),
      h("span", { class: "notice-text" }, `${context ? `${context}: ` : ""}${error.message}`),
      h("span", { class: "notice-count" }),
      h("button", { class: "notice-close", type: "button", title: "Dismiss", onclick: () => this.clear(key) }, "×"),
    );
    this.shown.set(key, { element, count: 1, text });
    this.container.append(element);
  }

  clear(key) {
    const existing = this.shown.get(key);
    if (!existing) return;
    existing.element.remove();
    this.shown.delete(key);
  }

  clearAll() {
    for (const key of [...this.shown.keys()]) this.clear(key);
  }
}
