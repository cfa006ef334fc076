// "Create test generation": a form over `POST /v1/streams` with the fake model's options
// (`fake`: tokens_per_second, fail_after_tokens, seed), metadata, and a live preview of the
// exact request body, so what an operator clicks is what they could send with curl.

import { h, setText } from "./dom.js";

const PRESETS = [
  ["Slow · 5 tok/s", { tokens_per_second: 5, max_tokens: 40, fail_after_tokens: "" }],
  ["Typical · 20 tok/s", { tokens_per_second: 20, max_tokens: 64, fail_after_tokens: "" }],
  ["Fast · 500 tok/s", { tokens_per_second: 500, max_tokens: 400, fail_after_tokens: "" }],
  ["Fails after 10", { tokens_per_second: 20, max_tokens: 64, fail_after_tokens: 10 }],
];

export class CreatePanel {
  /** @param {import("./console.js").Context} ctx */
  constructor(ctx) {
    this.ctx = ctx;
    this.providers = new Map([["fake", "fake"]]);
  }

  mount(container) {
    this.element = this.build();
    container.replaceChildren(this.element);
    this.loadModels();
    this.preview();
  }

  unmount() {
    this.ctx.notices.clear("create");
  }

  build() {
    const field = (label, input, hint = "") =>
      h("label", { class: "field" }, h("span", { class: "field-label" }, label), input, hint ? h("span", { class: "field-hint" }, hint) : null);
    const number = (name, value, attrs = {}) => h("input", { type: "number", name, value: String(value), ...attrs });

    this.model = h("select", { name: "model", "aria-label": "Model" }, h("option", { value: "fake" }, "fake"));
    this.prompt = h("textarea", { name: "prompt", rows: 3 }, "Tell me how a durable log keeps a stream resumable.");
    this.maxTokens = number("max_tokens", 64, { min: 1, step: 1 });
    this.rate = number("tokens_per_second", 20, { min: 0.01, step: "any" });
    this.failAfter = h("input", { type: "number", name: "fail_after_tokens", min: 0, step: 1, placeholder: "never" });
    this.seed = number("seed", 0, { step: 1 });
    this.fake = h(
      "fieldset",
      { class: "fake-options", dataset: { role: "fake-options" } },
      h("legend", null, "fake model options"),
      h(
        "div",
        { class: "field-row" },
        field("tokens_per_second", this.rate, "pace of the fake model"),
        field("fail_after_tokens", this.failAfter, "end with an error event after N tokens"),
        field("seed", this.seed, "same prompt + seed = same text"),
      ),
    );
    this.metaRows = h("div", { class: "meta-rows", dataset: { role: "metadata" } });
    this.formError = h("div", { class: "form-error", role: "alert", dataset: { role: "form-error" }, hidden: true });
    this.authState = h("div", { class: "inline-state", dataset: { role: "create-auth" }, hidden: true });
    this.submit = h("button", { type: "submit", class: "button primary", dataset: { role: "create" } }, "Create and watch");
    this.requestPreview = h("pre", { class: "preview mono", dataset: { role: "preview" } });

    const form = h(
      "form",
      { class: "panel create-form", onsubmit: (e) => this.create(e), oninput: () => this.preview(), onchange: () => this.preview() },
      h("div", { class: "panel-title" }, "Request"),
      this.authState,
      h("div", { class: "presets" }, h("span", { class: "muted" }, "presets"), PRESETS.map(([label, values]) => h("button", { type: "button", class: "chip chip-button", onclick: () => this.applyPreset(values) }, label))),
      h("div", { class: "field-row" }, field("model", this.model), field("max_tokens", this.maxTokens)),
      field("prompt (one user message)", this.prompt),
      this.fake,
      h(
        "fieldset",
        null,
        h("legend", null, "metadata"),
        this.metaRows,
        h("button", { type: "button", class: "button small", dataset: { role: "add-metadata" }, onclick: () => this.addMeta() }, "+ add key"),
      ),
      this.formError,
      h("div", { class: "form-actions" }, this.submit),
    );
    return h(
      "section",
      { class: "view view-create", dataset: { view: "create" } },
      h("div", { class: "toolbar" }, h("a", { href: "#/streams", class: "crumb" }, "Streams"), h("span", { class: "crumb-sep" }, "/"), h("h1", null, "Create test generation")),
      h("div", { class: "create-grid" }, form, h("div", { class: "panel" }, h("div", { class: "panel-title" }, "POST /v1/streams"), this.requestPreview)),
    );
  }

  async loadModels() {
    try {
      const answer = await this.ctx.api.models();
      const current = this.model.value;
      this.providers = new Map(answer.data.map((m) => [m.id, m.provider]));
      this.model.replaceChildren(...answer.data.map((m) => h("option", { value: m.id, selected: m.id === current }, `${m.id} (${m.provider})`)));
      this.authState.hidden = true;
      this.submit.disabled = false;
    } catch (error) {
      if (error.needsKey) {
        this.authState.hidden = false;
        this.authState.replaceChildren(
          h("strong", null, "Enter an API key to create generations."),
          ` The broker answered ${error.status} ${error.code}: ${error.message}`,
        );
        this.submit.disabled = true;
      } else {
        this.ctx.notices.error("create", error, "listing models");
      }
    }
    this.preview();
  }

  applyPreset(values) {
    this.rate.value = String(values.tokens_per_second);
    this.maxTokens.value = String(values.max_tokens);
    this.failAfter.value = String(values.fail_after_tokens);
    this.preview();
  }

  addMeta(key = "", value = "") {
    const row = h(
      "div",
      { class: "meta-row" },
      h("input", { type: "text", name: "meta-key", placeholder: "key", value: key, "aria-label": "Metadata key" }),
      h("input", { type: "text", name: "meta-value", placeholder: "value", value, "aria-label": "Metadata value" }),
      h("button", { type: "button", class: "icon-button", title: "Remove", onclick: () => { row.remove(); this.preview(); } }, "×"),
    );
    this.metaRows.append(row);
    row.querySelector("input").focus();
    this.preview();
  }

  /** The request body exactly as it will be sent. Numbers the browser cannot parse are sent
   * as typed, so the broker's validation (which names the field) explains them. */
  body() {
    const model = this.model.value;
    const body = { model, messages: [{ role: "user", content: this.prompt.value }] };
    if (this.maxTokens.value !== "") body.max_tokens = numeric(this.maxTokens.value);
    const metadata = {};
    for (const row of this.metaRows.children) {
      const [key, value] = row.querySelectorAll("input");
      if (key.value.trim()) metadata[key.value.trim()] = value.value;
    }
    if (Object.keys(metadata).length) body.metadata = metadata;
    if (this.providers.get(model) === "fake") {
      body.fake = {
        tokens_per_second: numeric(this.rate.value),
        fail_after_tokens: this.failAfter.value === "" ? null : numeric(this.failAfter.value),
        seed: this.seed.value === "" ? 0 : numeric(this.seed.value),
      };
    }
    return body;
  }

  preview() {
    const isFake = this.providers.get(this.model.value) === "fake";
    this.fake.disabled = !isFake;
    this.fake.classList.toggle("disabled", !isFake);
    setText(this.requestPreview, JSON.stringify(this.body(), null, 2));
  }

  async create(event) {
    event.preventDefault();
    this.formError.hidden = true;
    this.submit.disabled = true;
    setText(this.submit, "Creating…");
    try {
      const answer = await this.ctx.api.createStream(this.body());
      if (answer.read_token) this.ctx.session.rememberToken(answer.id, answer.read_token);
      this.ctx.notices.clear("create");
      this.ctx.navigate(`#/streams/${answer.id}`);
    } catch (error) {
      this.formError.hidden = false;
      const status = error.status ? `${error.status} ` : "";
      this.formError.replaceChildren(h("strong", null, `${status}${error.code}`), ` ${error.message}`);
      if (error.needsKey) this.ctx.focusKey();
    } finally {
      this.submit.disabled = false;
      setText(this.submit, "Create and watch");
    }
  }
}

function numeric(text) {
  const value = Number(text);
  return text.trim() !== "" && Number.isFinite(value) ? value : text;
}
