// DOM helpers. Everything the console shows that came from the broker (stream text, event
// data, metadata, error messages) goes into the page as text nodes or textContent, never as
// markup: model output is untrusted, and the page's CSP forbids inline script anyway.

/**
 * Create an element: h("div", {class: "x", dataset: {id: 1}, onclick: fn}, "text", child).
 * Attribute values of `false`, null or undefined are left out; `true` sets an empty one.
 * @param {string} tag
 * @param {Record<string, any>|null} [attrs]
 * @param {...(Node|string|number|null|undefined|false|Array<any>)} children
 * @returns {HTMLElement}
 */
export function h(tag, attrs = null, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "dataset") Object.assign(element.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (name === "value" || name === "checked" || name === "disabled") {
      element[name] = value;
    } else element.setAttribute(name, value === true ? "" : String(value));
  }
  append(element, children);
  return element;
}

function append(parent, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(parent, child);
    else parent.append(child instanceof Node ? child : String(child));
  }
}

/** Set text only when it changed: polling re-renders every second, most cells stay equal. */
export function setText(element, text) {
  const value = String(text);
  if (element.textContent !== value) element.textContent = value;
}

export function clear(element) {
  element.replaceChildren();
}

/** Copy to the clipboard; the promise says whether it worked (it needs a secure context). */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    return false;
  }
}

/** A small labelled select: options are [value, label] pairs or plain values. */
export function select(attrs, options, selected) {
  return h(
    "select",
    attrs,
    options.map((option) => {
      const [value, label] = Array.isArray(option) ? option : [option, option];
      return h("option", { value, selected: String(value) === String(selected) }, label);
    }),
  );
}
