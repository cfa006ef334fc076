// The Vercel AI SDK's UI message stream (`format=ai-sdk`) read by `ai` itself: its chat
// transport's `reconnectToStream` and `readUIMessageStream`, on one connection and across a
// proxy that cuts every connection.
import { EventSourceParserStream, safeParseJSON } from "@ai-sdk/provider-utils";
import { DefaultChatTransport, readUIMessageStream, uiMessageChunkSchema } from "ai";

import { BROKER, PROXY, check, createStream, eventsUrl, main, within } from "./lib.mjs";

/** The last message `readUIMessageStream` makes of `chunks` (a ReadableStream), and the
 *  errors it reported (an `error` chunk is reported, not thrown). */
async function finalMessage(chunks) {
  let message = null;
  const errors = [];
  const messages = readUIMessageStream({ stream: chunks, onError: (e) => errors.push(e.message) });
  for await (const snapshot of messages) message = snapshot;
  return { message, errors };
}

/** A pass-through that records the chunk types going by, and `error` chunks whole. */
function recording(seen) {
  seen.chunk_types = [];
  seen.error_chunks = [];
  return new TransformStream({
    transform(chunk, controller) {
      seen.chunk_types.push(chunk.type);
      if (chunk.type === "error") seen.error_chunks.push(chunk);
      controller.enqueue(chunk);
    },
  });
}

/** The UI message stream protocol the last response of `reconnect` declared in its header. */
let protocol = null;

/** DefaultChatTransport's `reconnectToStream` aimed at the broker's events of stream `id`
 *  (the chat id), from `lastEventId` if given: a ReadableStream of validated chunks, or null
 *  when the broker answers 204 (nothing after that point). */
function reconnect(id, lastEventId) {
  const transport = new DefaultChatTransport({
    fetch: async (input, init) => {
      const response = await fetch(input, init);
      protocol = response.headers.get("x-vercel-ai-ui-message-stream");
      return response;
    },
    prepareReconnectToStreamRequest: ({ id: chatId, headers }) => ({
      api: eventsUrl(BROKER, chatId, { format: "ai-sdk" }),
      headers: lastEventId === undefined ? headers : { ...headers, "Last-Event-ID": lastEventId },
    }),
  });
  return transport.reconnectToStream({ chatId: id });
}

/** Stream `id` on one connection, read as `useChat` resumes a chat: DefaultChatTransport's
 *  `reconnectToStream` (GET; 204 = nothing to resume) validates every chunk against
 *  `uiMessageChunkSchema`; `readUIMessageStream` makes the message. */
async function readWhole(id) {
  const chunks = await reconnect(id);
  check(chunks !== null, "reconnectToStream answered 204 for a stream that has events");
  const seen = {};
  const read = await within(30_000, finalMessage(chunks.pipeThrough(recording(seen))), id);
  return { ...read, ...seen, protocol };
}

/** Stream `id` through the cutting proxy: each connection's SSE parsed with the AI SDK's
 *  parser and every chunk validated by `uiMessageChunkSchema`; a cut is resumed with
 *  `Last-Event-ID` set to the last id received. All connections feed ONE stream of UI message
 *  chunks into ONE `readUIMessageStream`. */
async function readAcrossCuts(id) {
  const { readable, writable } = new TransformStream();
  const seen = { connections: 0, failed_connects: 0, ids: [], sent_ids: [] };
  const reading = finalMessage(readable.pipeThrough(recording(seen)));
  const writer = writable.getWriter();
  const url = eventsUrl(PROXY, id, { format: "ai-sdk" });
  let lastId = null;
  for (let finished = false, attempt = 0; !finished; attempt++) {
    check(attempt < 300, "no end after 300 connections");
    seen.sent_ids.push(lastId);
    let response;
    try {
      response = await fetch(url, { headers: lastId === null ? {} : { "Last-Event-ID": lastId } });
    } catch {
      seen.failed_connects++; // cut before the response head
      continue;
    }
    if (!response.ok) throw new Error(`answered ${response.status}: ${await response.text()}`);
    seen.connections++;
    const events = response.body
      .pipeThrough(new TextDecoderStream())
      .pipeThrough(new EventSourceParserStream());
    let invalid = null;
    try {
      for await (const { data, id: eventId } of events) {
        if (data === "[DONE]") {
          finished = true;
        } else {
          const chunk = await safeParseJSON({ text: data, schema: uiMessageChunkSchema });
          if (!chunk.success) {
            invalid = new Error(`not a UI message chunk: ${data}`);
            break;
          }
          await writer.write(chunk.value);
        }
        if (eventId !== undefined) {
          lastId = eventId;
          seen.ids.push(eventId);
        }
      }
    } catch {
      // the cut: resume from lastId
    }
    if (invalid) throw invalid;
  }
  await writer.close();
  return { ...(await within(30_000, reading, "readUIMessageStream")), ...seen };
}

const cases = {
  /** A new stream, read on one connection. */
  async live(params) {
    const id = await createStream(params);
    return { stream_id: id, ...(await readWhole(id)) };
  },

  /** A new stream read across cuts, then read again whole on one connection; and what
   *  `reconnectToStream` makes of a resume from the last id (the end): null, for a 204. */
  async resume(params) {
    check(PROXY, "SB_PROXY is needed");
    const id = await createStream(params);
    const resumed = await within(30_000, readAcrossCuts(id), `reading ${id} across cuts`);
    const afterEnd = await reconnect(id, resumed.ids.at(-1));
    return {
      stream_id: id,
      ...resumed,
      whole: await readWhole(id),
      after_end: afterEnd === null ? null : "a stream",
    };
  },
};

await main(cases);
