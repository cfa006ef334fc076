// The seam of a continued generation (a `resumed` event between two attempts' tokens), read
// without a broker by tests/test_resumed_event_formats.py as `node resumed-seam.mjs <case>`,
// with the case's input on stdin; it prints ONE line of JSON: what the client observed.
//
//   ai-sdk          stdin: the `format=ai-sdk` body the broker sends for such a stream. Every
//                   chunk is validated by `ai`'s `uiMessageChunkSchema` and the message made
//                   by its `readUIMessageStream`, as the chat client does.
//   browser-client  stdin: the broker's events as JSON `[{id, type, data}]`, delivered to
//                   /static/streambroker.js's `watch()` through a stand-in EventSource that,
//                   like the browser's, hands a named event only to listeners of its name.

import { EventSourceParserStream, safeParseJSON } from "@ai-sdk/provider-utils";
import { readUIMessageStream, uiMessageChunkSchema } from "ai";

async function stdin() {
  let text = "";
  for await (const chunk of process.stdin) text += chunk;
  return text;
}

async function aiSdk() {
  const frames = new Response(await stdin()).body
    .pipeThrough(new TextDecoderStream())
    .pipeThrough(new EventSourceParserStream());
  const seen = { ids: [], chunk_types: [], data_chunks: [], invalid: [] };
  const chunks = [];
  for await (const { data, id } of frames) {
    seen.ids.push(id ?? null);
    if (data === "[DONE]") continue;
    const chunk = await safeParseJSON({ text: data, schema: uiMessageChunkSchema });
    if (!chunk.success) {
      seen.invalid.push(data);
      continue;
    }
    seen.chunk_types.push(chunk.value.type);
    if (chunk.value.type.startsWith("data-")) seen.data_chunks.push(chunk.value);
    chunks.push(chunk.value);
  }
  const errors = [];
  let message = null;
  const stream = new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(chunk);
      controller.close();
    },
  });
  const messages = readUIMessageStream({ stream, onError: (e) => errors.push(e.message) });
  for await (const snapshot of messages) message = snapshot;
  return { ...seen, parts: message?.parts ?? null, errors };
}

/** Just enough of the browser's EventSource for the watcher: named events reach only the
 *  listeners of their name (an event type the watcher does not listen to is lost). */
class StandInEventSource {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSED = 2;
  static opened = [];

  constructor(url) {
    this.url = url;
    this.readyState = StandInEventSource.CONNECTING;
    this.listeners = new Map();
    StandInEventSource.opened.push(this);
  }

  addEventListener(type, listener) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(listener);
  }

  close() {
    this.readyState = StandInEventSource.CLOSED;
  }

  dispatch(type, event) {
    for (const listener of this.listeners.get(type) ?? []) listener(event);
  }
}

async function browserClient() {
  const events = JSON.parse(await stdin());
  globalThis.EventSource = StandInEventSource;
  const { watch } = await import(new URL("../../../api/static/streambroker.js", import.meta.url));
  const calls = [];
  const watcher = watch(
    { streamId: "s1", baseUrl: "http://broker.test" },
    {
      onMetadata: (_data, event) => calls.push(["metadata", event.id]),
      onToken: (text, event) => calls.push(["token", text, event.id]),
      // Not an end: the watch must still be live when the seam is reported.
      onResumed: (data, event) => calls.push(["resumed", data, event.id, watcher.ended, watcher.state]),
      onDone: (data, event) => calls.push(["done", data.finish_reason, event.id]),
      onError: (error) => calls.push(["error", error.code]),
    },
  );
  const source = StandInEventSource.opened.at(-1);
  source.readyState = StandInEventSource.OPEN;
  source.dispatch("open", new Event("open"));
  for (const { id, type, data } of events) {
    source.dispatch(type, new MessageEvent(type, { data: JSON.stringify(data), lastEventId: String(id) }));
  }
  return {
    calls,
    last_event_id: watcher.lastEventId,
    ended: watcher.ended,
    connections: StandInEventSource.opened.length,
    stats: { events: watcher.stats.events, token_events: watcher.stats.tokenEvents },
  };
}

const cases = { "ai-sdk": aiSdk, "browser-client": browserClient };
const run = cases[process.argv[2]];
if (!run) {
  console.error(`unknown case ${JSON.stringify(process.argv[2])}; known: ${Object.keys(cases).join(", ")}`);
  process.exit(2);
}
try {
  process.stdout.write(JSON.stringify(await run()) + "\n");
  process.exit(0); // the watcher's timers must not hold the test
} catch (error) {
  console.error(error?.stack ?? String(error));
  process.exit(1);
}
