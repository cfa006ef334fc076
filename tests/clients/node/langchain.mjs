// LangChain's `ChatOpenAI` (@langchain/openai) on the broker's OpenAI-compatible API.
import { concat } from "@langchain/core/utils/stream";
import { ChatOpenAI } from "@langchain/openai";

import { BROKER, MESSAGES, fakeBody, main } from "./lib.mjs";

/** The chat model of a case; the fake model's options travel in `modelKwargs` (the body). */
function chat({ model = "fake", maxTokens, seed, rate }) {
  return new ChatOpenAI({
    model,
    apiKey: "unused",
    configuration: { baseURL: `${BROKER}/v1` },
    maxTokens,
    maxRetries: 0,
    ...(model === "fake" ? { modelKwargs: fakeBody({ seed, rate }) } : {}),
  });
}

/** Tools in OpenAI's shape, as `bindTools` accepts them. */
const TOOLS = [
  {
    type: "function",
    function: {
      name: "get_weather",
      description: "The weather in a city",
      parameters: {
        type: "object",
        properties: { city: { type: "string" }, unit: { type: "string" } },
        required: ["city", "unit"],
      },
    },
  },
  {
    type: "function",
    function: {
      name: "get_time",
      description: "The time in a time zone",
      parameters: {
        type: "object",
        properties: { timezone: { type: "string" } },
        required: ["timezone"],
      },
    },
  },
];

/** What an AIMessage(Chunk) says. */
function observed(message) {
  return {
    text: message.text,
    usage_metadata: message.usage_metadata ?? null,
    finish_reason: message.response_metadata?.finish_reason ?? null,
    tool_calls: (message.tool_calls ?? []).map(({ id, name, args }) => ({ id, name, args })),
  };
}

const cases = {
  /** `.stream()`: the chunks' text in order, and the chunks merged with `concat`. */
  async stream(params) {
    const model = params.tools ? chat(params).bindTools(TOOLS) : chat(params);
    const texts = [];
    let merged;
    for await (const chunk of await model.stream(MESSAGES)) {
      texts.push(chunk.text);
      merged = merged === undefined ? chunk : concat(merged, chunk);
    }
    return { chunks_text: texts.join(""), ...observed(merged) };
  },

  /** `.invoke()`: one AIMessage. */
  async invoke(params) {
    const model = params.tools ? chat(params).bindTools(TOOLS) : chat(params);
    return observed(await model.invoke(MESSAGES));
  },
};

await main(cases);
