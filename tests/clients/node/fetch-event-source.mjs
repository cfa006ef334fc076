// `@microsoft/fetch-event-source`: fetch-based SSE with its own retry loop, reading a broker
// stream (through a proxy that cuts every connection, when SB_PROXY is set). The script
// supplies what the library's docs ask for: `onclose` throws to have a premature end retried,
// `onerror` returns the retry delay, and the caller aborts once the stream's end has come.
//
// One correction, made in the `fetch` it is given: the library takes an event's id as the
// `Last-Event-ID` to resume from as soon as it parses the `id:` line, before the blank line
// that completes (dispatches) the event (the spec sets the last event id on dispatch). A cut
// between the two makes it resume after an event it never delivered: that event is lost. The
// broker sends `id:` last in each event, which narrows that window to the one byte between
// the `id:` line and the blank line; the wrapper sends the id of the last message the library
// delivered instead, and records each time the library's own choice differed, with where the
// connection before it stopped (`premature_ids`).
import fetchEventSourcePackage from "@microsoft/fetch-event-source";

import { BROKER, PROXY, createStream, eventsUrl, main, watchingBytes, within } from "./lib.mjs";

const { fetchEventSource } = fetchEventSourcePackage;

// The library is written for browsers: it reaches for `window` timers and listens to
// `document` visibility (not with `openWhenHidden`, but it still removes its listener).
globalThis.window ??= globalThis;
globalThis.document ??= { hidden: false, addEventListener() {}, removeEventListener() {} };

class Fatal extends Error {}

/** Read `url` until `isEnd(message)`: the messages as [event, id, data], and what the
 *  library did: connections, reconnects, and the `Last-Event-ID` each request sent. */
async function read(url, isEnd) {
  const seen = {
    events: [],
    connections: 0,
    reconnects: 0,
    sent_ids: [],
    premature_ids: [],
    empty_messages: 0,
  };
  const stop = new AbortController();
  let delivered = null; // the id of the last message with an id that onmessage received
  let chosen = null; // the id the library would send
  const watched = watchingBytes(seen);
  const run = fetchEventSource(url, {
    signal: stop.signal,
    openWhenHidden: true,
    fetch: (input, init) => {
      const previous = chosen;
      chosen = init.headers["last-event-id"] ?? null;
      // A new premature id: the last response stopped right after its `id:` line.
      if (chosen !== delivered && chosen !== previous) {
        seen.premature_ids.push([chosen, seen.tails.at(-1)]);
      }
      seen.sent_ids.push(delivered);
      const headers = { ...init.headers };
      if (delivered === null) delete headers["last-event-id"];
      else headers["last-event-id"] = delivered;
      return watched(input, { ...init, headers });
    },
    async onopen(response) {
      seen.connections++;
      if (response.status !== 200) throw new Fatal(`answered ${response.status}`);
    },
    onmessage(message) {
      if (message.data === "") seen.empty_messages++;
      seen.events.push([message.event, message.id, message.data]);
      if (message.id !== "") delivered = message.id;
      if (isEnd(message)) stop.abort();
    },
    onclose() {
      if (!stop.signal.aborted) throw new Error("the response ended before the stream did");
    },
    onerror(error) {
      if (error instanceof Fatal) throw error; // stops the retry loop; `run` rejects
      seen.reconnects++;
      return 10; // ms
    },
  });
  await within(30_000, run, `fetchEventSource ${url}`);
  return seen;
}

const cases = {
  /** The broker's own format, until `done` (or an `error` event). */
  async native(params) {
    const id = await createStream(params);
    const end = (m) => m.event === "done" || m.event === "error";
    return { stream_id: id, ...(await read(eventsUrl(PROXY ?? BROKER, id), end)) };
  },

  /** format=openai (ids `<n>` and `<n>.<k>`), until `[DONE]`. */
  async openai(params) {
    const id = await createStream(params);
    const url = eventsUrl(PROXY ?? BROKER, id, { format: "openai", include_usage: "true" });
    return { stream_id: id, ...(await read(url, (m) => m.data === "[DONE]")) };
  },
};

await main(cases);
