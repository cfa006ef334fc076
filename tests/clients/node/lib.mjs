// What the client scripts share. Each script is run by tests/test_clients_node_*.py as
// `node <script>.mjs <case> '<json params>'`, with the broker's addresses in the environment:
//
//   SB_BROKER    the api process, e.g. http://127.0.0.1:8000
//   SB_PROXY     a cutting proxy in front of it (tests/support/chaos_proxy.py), when the case
//                needs one
//   SB_MESSAGES  the chat messages to send (JSON), the same the Python side computes the
//                fake model's expected text from
//
// A script prints ONE line of JSON: what the client library observed. The Python side
// compares it with what it expects; a script fails (non-zero exit, the error on stderr)
// only when the client itself throws or a script-level check (named in the message) fails.

export const BROKER = required("SB_BROKER");
export const PROXY = process.env.SB_PROXY ?? null;
export const MESSAGES = JSON.parse(required("SB_MESSAGES"));

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}

/** Run `cases[argv[2]]` with the JSON params of argv[3]; print its result as one JSON line. */
export async function main(cases) {
  const [name, raw] = process.argv.slice(2);
  const run = cases[name];
  if (!run) {
    console.error(`unknown case ${JSON.stringify(name)}; known: ${Object.keys(cases).join(", ")}`);
    process.exit(2);
  }
  try {
    const result = await run(JSON.parse(raw || "{}"));
    process.stdout.write(JSON.stringify(result) + "\n");
    process.exit(0); // keep-alive sockets and timers of the libraries must not hold the test
  } catch (error) {
    console.error(error?.stack ?? String(error));
    if (error?.cause) console.error("cause:", error.cause);
    process.exit(1);
  }
}

/** The body options of the built-in fake model (`failAfter`: fail after that many tokens). */
export function fakeBody({ seed = 0, rate = 400, failAfter } = {}) {
  const fake = { seed, tokens_per_second: rate };
  if (failAfter !== undefined) fake.fail_after_tokens = failAfter;
  return { fake };
}

/** A generation made with the broker's own API (`POST /v1/streams`), not through a client. */
export async function createStream({ model = "fake", maxTokens, seed, rate, failAfter }) {
  const body = { model, messages: MESSAGES };
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  if (model === "fake") Object.assign(body, fakeBody({ seed, rate, failAfter }));
  const response = await fetch(`${BROKER}/v1/streams`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  if (response.status !== 201) {
    throw new Error(`POST /v1/streams answered ${response.status}: ${await response.text()}`);
  }
  return (await response.json()).id;
}

/** The events URL of stream `id` at `base` (the broker, or the proxy in front of it). */
export function eventsUrl(base, id, query = {}) {
  const url = new URL(`/v1/streams/${id}/events`, base);
  for (const [key, value] of Object.entries(query)) url.searchParams.set(key, value);
  return url.href;
}

/** Fail the script with `message` unless `condition`. */
export function check(condition, message) {
  if (!condition) throw new Error(`check failed: ${message}`);
}

/** Resolve with `promise`, or reject after `ms` (a client that stops making progress). */
export function within(ms, promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no end within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A `fetch` that watches the bytes of event-stream responses on their way to the library:
 *  it counts the `: ping` heartbeat lines (`seen.pings`) and keeps the last bytes each
 *  response carried (`seen.tails`, one per response: where a cut connection stopped). */
export function watchingBytes(seen, fetchImpl = fetch) {
  seen.pings = 0;
  seen.tails = [];
  return async (input, init) => {
    const response = await fetchImpl(input, init);
    if (response.body === null || response.status !== 200) return response;
    const index = seen.tails.push("") - 1;
    const decoder = new TextDecoder();
    let partial = "";
    const watcher = new TransformStream({
      transform(bytes, controller) {
        const text = decoder.decode(bytes, { stream: true });
        seen.tails[index] = (seen.tails[index] + text).slice(-120);
        const lines = (partial + text).split("\n");
        partial = lines.pop();
        seen.pings += lines.filter((line) => line === ": ping").length;
        controller.enqueue(bytes);
      },
    });
    const { status, statusText, headers } = response;
    return new Response(response.body.pipeThrough(watcher), { status, statusText, headers });
  };
}
