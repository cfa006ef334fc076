// `eventsource` (v5): the WHATWG EventSource for Node, reading a broker stream (through a
// proxy that cuts every connection, when SB_PROXY is set). It reconnects by itself after
// `retry:` and sends the last id it dispatched as `Last-Event-ID`; the script only listens
// (and watches the bytes on the wire, through the `fetch` it gives the library).
import { EventSource } from "eventsource";

import { BROKER, PROXY, createStream, eventsUrl, main, watchingBytes, within } from "./lib.mjs";

const BROKER_TYPES = ["metadata", "token", "tool_call", "progress", "done", "error"];

/** Read `url` until `isEnd(event)`; every event as [type, lastEventId, data], and counts. */
function read(url, isEnd) {
  const seen = { events: [], opens: 0, reconnects: 0, empty_messages: 0 };
  const source = new EventSource(url, { fetch: watchingBytes(seen) });
  const finished = new Promise((resolve, reject) => {
    const take = (event) => {
      if (event.type === "message" && event.data === "") seen.empty_messages++;
      seen.events.push([event.type, event.lastEventId, event.data]);
      if (isEnd(event)) {
        source.close();
        resolve(seen);
      }
    };
    for (const type of [...BROKER_TYPES, "message"]) {
      source.addEventListener(type, (event) => {
        if (type !== "error" || event.data !== undefined) take(event); // an SSE `event: error`
      });
    }
    source.addEventListener("open", () => seen.opens++);
    source.addEventListener("error", (event) => {
      if (event.data !== undefined) return;
      // A connection error: EventSource reconnects unless it closed (a 204, a non-200).
      if (source.readyState === EventSource.CLOSED) reject(new Error(`closed: ${event.message}`));
      else seen.reconnects++;
    });
  });
  return within(30_000, finished, `EventSource ${url}`).finally(() => source.close());
}

const cases = {
  /** The broker's own format: named events, read until `done` (or an `error` event). */
  async native(params) {
    const id = await createStream(params);
    const end = (e) => e.type === "done" || e.type === "error";
    const seen = await read(eventsUrl(PROXY ?? BROKER, id), end);
    return { stream_id: id, ...seen };
  },

  /** format=openai: unnamed `message` events, `<n>.<k>` ids, read until `[DONE]`. */
  async openai(params) {
    const id = await createStream(params);
    const url = eventsUrl(PROXY ?? BROKER, id, { format: "openai", include_usage: "true" });
    const seen = await read(url, (e) => e.data === "[DONE]");
    return { stream_id: id, ...seen };
  },
};

await main(cases);
