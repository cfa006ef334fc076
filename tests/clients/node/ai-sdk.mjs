// The Vercel AI SDK (`ai`) with `@ai-sdk/openai-compatible`, pointed at the broker's
// OpenAI-compatible API: streamText / generateText, with and without tools.
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateText, jsonSchema, streamText, tool } from "ai";
import { z } from "zod";

import { BROKER, MESSAGES, fakeBody, main } from "./lib.mjs";

const broker = createOpenAICompatible({
  baseURL: `${BROKER}/v1`,
  name: "broker",
  apiKey: "unused",
  includeUsage: true,
});

/** Tools as an application defines them, without `execute`: the calls come back to us. One
 *  with a zod schema, one with a plain JSON schema. */
const TOOLS = {
  get_weather: tool({
    description: "The weather in a city",
    inputSchema: z.object({ city: z.string(), unit: z.enum(["celsius", "fahrenheit"]) }),
  }),
  get_time: tool({
    description: "The time in a time zone",
    inputSchema: jsonSchema({
      type: "object",
      properties: { timezone: { type: "string" } },
      required: ["timezone"],
    }),
  }),
};

/** The options of a case: model, token count, (fake) seed, speed and failure, tools or not,
 *  and the SDK's own retries (`defaultRetries`) or none. */
function options({ model = "fake", maxTokens, seed, rate, failAfter, tools, defaultRetries }) {
  return {
    model: broker.chatModel(model),
    messages: MESSAGES,
    maxOutputTokens: maxTokens,
    ...(defaultRetries ? {} : { maxRetries: 0 }),
    // providerOptions.<name> are added to the request body: the fake model's options.
    providerOptions: model === "fake" ? { broker: fakeBody({ seed, rate, failAfter }) } : {},
    ...(tools ? { tools: TOOLS } : {}),
  };
}

/** An error as the application sees it: its class, message, and the API error's details. */
const describe = (error) => ({
  name: error?.constructor?.name ?? typeof error,
  message: error?.message ?? String(error),
  data: error?.data ?? null,
});

const calls = (toolCalls) =>
  toolCalls.map(({ toolCallId, toolName, input }) => ({ toolCallId, toolName, input }));

const cases = {
  /** streamText: the parts of `fullStream` (errors are parts too), then the result's
   *  promises. */
  async stream(params) {
    const result = streamText(options(params));
    const deltas = [];
    const parts = [];
    const errors = [];
    for await (const part of result.fullStream) {
      parts.push(part.type);
      if (part.type === "text-delta") deltas.push(part.text);
      if (part.type === "error") errors.push(describe(part.error));
    }
    if (errors.length) return { deltas: deltas.join(""), errors, part_types: [...new Set(parts)] };
    return {
      errors,
      deltas: deltas.join(""),
      text: await result.text,
      finish_reason: await result.finishReason,
      raw_finish_reason: await result.rawFinishReason,
      usage: await result.usage,
      tool_calls: calls(await result.toolCalls),
      part_types: [...new Set(parts)],
    };
  },

  /** generateText: one non-streamed answer (or the error it throws). */
  async generate(params) {
    let result;
    try {
      result = await generateText(options(params));
    } catch (error) {
      return { error: describe(error), status: error.lastError?.statusCode ?? error.statusCode };
    }
    return {
      text: result.text,
      finish_reason: result.finishReason,
      raw_finish_reason: result.rawFinishReason,
      usage: result.usage,
      tool_calls: calls(result.toolCalls),
    };
  },
};

await main(cases);
