// The official `openai` Node SDK, unchanged, pointed at the broker with `baseURL`.
import OpenAI from "openai";
import { ChatCompletionStream } from "openai/lib/ChatCompletionStream";
import { Stream } from "openai/streaming";

import { BROKER, MESSAGES, PROXY, check, eventsUrl, fakeBody, main } from "./lib.mjs";

const client = (base = BROKER, options = {}) =>
  new OpenAI({ baseURL: `${base}/v1`, apiKey: "unused", ...options });

/** The request body of a case: the model, its token count and (fake) seed and speed. */
function request({ model = "fake", maxTokens, seed, rate }) {
  const body = { model, messages: MESSAGES };
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  return model === "fake" ? { ...body, ...fakeBody({ seed, rate }) } : body;
}

/** Tool calls folded from stream deltas, by index: [{id, name, arguments}]. */
function foldToolCalls(chunks) {
  const calls = [];
  for (const chunk of chunks) {
    for (const delta of chunk.choices[0]?.delta?.tool_calls ?? []) {
      const call = (calls[delta.index] ??= { id: null, name: "", arguments: "" });
      call.id ??= delta.id ?? null;
      call.name += delta.function?.name ?? "";
      call.arguments += delta.function?.arguments ?? "";
    }
  }
  return calls;
}

/** What a list of chunks says: text, finish reasons, usage, tool calls, ids. */
function summary(chunks) {
  return {
    first_delta: chunks[0]?.choices[0]?.delta ?? null,
    text: chunks.map((c) => c.choices[0]?.delta?.content ?? "").join(""),
    finish_reasons: chunks.flatMap((c) => c.choices.map((x) => x.finish_reason)).filter(Boolean),
    usage: chunks.at(-1)?.usage ?? null,
    usage_chunk_choices: chunks.at(-1)?.choices ?? null,
    tool_calls: foldToolCalls(chunks),
    ids: [...new Set(chunks.map((c) => c.id))],
    objects: [...new Set(chunks.map((c) => c.object))],
    event_ids: chunks.map((c) => c.event_id),
  };
}

/** The tool definitions a tool call needs to be asked for (tool-model calls them anyway). */
const TOOLS = ["get_weather", "get_time"].map((name) => ({
  type: "function",
  function: { name, parameters: { type: "object", properties: {} } },
}));

/** A ChatCompletionStream fed `chunks` (as `toReadableStream()` would carry them). */
async function accumulate(chunks) {
  const lines = new TextEncoder().encode(chunks.map((c) => JSON.stringify(c) + "\n").join(""));
  const readable = new ReadableStream({
    start(controller) {
      controller.enqueue(lines);
      controller.close();
    },
  });
  const completion = await ChatCompletionStream.fromReadableStream(readable).finalChatCompletion();
  const { message, finish_reason } = completion.choices[0];
  return { role: message.role, content: message.content, finish_reason };
}

const cases = {
  /** `create({stream: true})`: the chunks as the SDK yields them, and the stream id header. */
  async stream(params) {
    const { data, response } = await client()
      .chat.completions.create({
        ...request(params),
        stream: true,
        ...(params.includeUsage ? { stream_options: { include_usage: true } } : {}),
        ...(params.tools ? { tools: TOOLS } : {}),
      })
      .withResponse();
    const chunks = [];
    for await (const chunk of data) chunks.push(chunk);
    return { stream_id: response.headers.get("x-stream-id"), ...summary(chunks) };
  },

  /** `create({stream: false})`: one chat.completion. */
  async complete(params) {
    const completion = await client().chat.completions.create({
      ...request(params),
      ...(params.tools ? { tools: TOOLS } : {}),
    });
    const { message, finish_reason } = completion.choices[0];
    return {
      object: completion.object,
      role: message.role,
      content: message.content,
      tool_calls: (message.tool_calls ?? []).map((c) => ({
        id: c.id,
        name: c.function.name,
        arguments: c.function.arguments,
      })),
      finish_reason,
      usage: completion.usage,
    };
  },

  /** `chat.completions.stream()`: the ChatCompletionStream helper's events and accumulator. */
  async helper(params) {
    const runner = client().chat.completions.stream({
      ...request(params),
      stream_options: { include_usage: true },
      ...(params.tools ? { tools: TOOLS } : {}),
    });
    const deltas = [];
    const done = [];
    runner.on("content.delta", ({ delta }) => deltas.push(delta));
    runner.on("tool_calls.function.arguments.done", ({ name, arguments: args }) =>
      done.push({ name, arguments: args }),
    );
    const completion = await runner.finalChatCompletion();
    const { message, finish_reason } = completion.choices[0];
    return {
      deltas: deltas.join(""),
      content: message.content,
      role: message.role,
      finish_reason,
      usage: completion.usage,
      tool_calls: (message.tool_calls ?? []).map((c) => ({
        id: c.id,
        name: c.function.name,
        arguments: c.function.arguments,
      })),
      arguments_done: done,
    };
  },

  /** `models.list()`: the broker's routed models, as the SDK's page iterator yields them. */
  async models() {
    const models = [];
    for await (const model of client().models.list()) models.push(model);
    const fields = ({ id, object, created, owned_by }) => ({ id, object, created, owned_by });
    return { models: models.map(fields) };
  },

  /** Streaming through a proxy that cuts every connection: the SDK makes the request; every
   *  cut is resumed from the last chunk's `event_id` at `…/events?format=openai`, the new
   *  response parsed by the SDK's own `Stream.fromSSEResponse`, until `[DONE]`. */
  async resume(params) {
    check(PROXY, "SB_PROXY is needed");
    const sdk = client(PROXY, { maxRetries: 0 }); // a retried POST would be a new generation
    const { data, response } = await sdk.chat.completions
      .create({ ...request(params), stream: true, stream_options: { include_usage: true } })
      .withResponse();
    const streamId = response.headers.get("x-stream-id");
    // Each connection: the Last-Event-ID it sent (null: none), and the chunks it brought.
    const connections = [{ from: null, chunks: [] }];
    let stream = data;
    let lastEventId = null;
    let failedConnects = 0;
    for (let attempt = 0; ; attempt++) {
      check(attempt < 300, `no end after 300 connections (${connections.length} read)`);
      if (stream !== null) {
        const { chunks } = connections.at(-1);
        try {
          for await (const chunk of stream) {
            chunks.push(chunk);
            lastEventId = chunk.event_id;
          }
          break; // the SDK ends its iteration at `data: [DONE]`
        } catch (error) {
          if (error instanceof OpenAI.APIError) throw error; // the broker's, not a cut
        }
      }
      stream = null;
      const url = eventsUrl(PROXY, streamId, { format: "openai", include_usage: "true" });
      let resumed;
      try {
        const headers = lastEventId === null ? {} : { "Last-Event-ID": lastEventId };
        resumed = await fetch(url, { headers });
      } catch {
        failedConnects++; // cut before the response head
        continue;
      }
      if (!resumed.ok) throw new Error(`answered ${resumed.status}: ${await resumed.text()}`);
      connections.push({ from: lastEventId, chunks: [] });
      stream = Stream.fromSSEResponse(resumed, new AbortController());
    }
    // A resumed connection opens with the role chunk (no SSE id; its event_id is the resume
    // point): set those apart, the rest must be the stream's chunks, each exactly once.
    const resumedAt = connections.findIndex((c) => c.from !== null);
    const leads = connections.filter((c) => c.from !== null).map((c) => [c.from, c.chunks[0]]);
    const all = connections.flatMap((c) => c.chunks);
    const before = connections.slice(0, resumedAt).flatMap((c) => c.chunks);
    return {
      stream_id: streamId,
      connections: connections.length,
      failed_connects: failedConnects,
      resumed_leads: leads.map(([from, c]) => ({
        from,
        delta: c?.choices[0].delta ?? null,
        event_id: c?.event_id ?? null,
      })),
      ...summary(all.filter((c) => !leads.some(([, lead]) => lead === c))),
      // The SDK's accumulator over everything, and over what came from the first resume on
      // (what a reader that joined there has: it needs the resumed stream's role chunk).
      accumulated: await accumulate(all),
      text_before_resuming: summary(before).text,
      accumulated_resumed: resumedAt > 0 ? await accumulate(all.slice(before.length)) : null,
    };
  },
};

await main(cases);
