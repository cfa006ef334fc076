// A chat page on the broker, built on the Vercel AI SDK's chat client (`ai`), no framework.
//
// The broker is the chat's backend: a message creates a generation (POST /v1/streams) and the
// answer is read from GET /v1/streams/{id}/events?format=ai-sdk, which speaks the AI SDK's
// UI message stream protocol. Without Last-Event-ID that URL replays the whole message from
// its start, then follows it live: what `DefaultChatTransport` expects of a reconnect
// (`resumeStreamIsReplay: true`). So a page reloaded mid-answer shows the exact answer again:
// it remembers the stream id (sessionStorage) and calls `chat.resumeStream()` on load.
//
// Query string (the fake model's options, for demos and tests):
//   ?model=fake&max_tokens=80&seed=1&tokens_per_second=40

import { AbstractChat, DefaultChatTransport } from 'ai';

const CHAT_ID = 'chat-page'; // one conversation per tab (sessionStorage is per tab)

// ---------------------------------------------------------------------------- transport

/** What the page keeps across a reload: the conversation as sent, and its answer's stream. */
const saved = {
  key: (chatId) => `streambroker-chat:${chatId}`,
  load: (chatId) => JSON.parse(sessionStorage.getItem(saved.key(chatId)) ?? 'null'),
  store: (chatId, value) => sessionStorage.setItem(saved.key(chatId), JSON.stringify(value)),
};

const eventsUrl = (streamId) => `/v1/streams/${encodeURIComponent(streamId)}/events?format=ai-sdk`;

/** The broker's create request: UI messages (their text parts) as OpenAI chat messages. */
function createRequest(messages) {
  const query = new URLSearchParams(location.search);
  const number = (name) => (query.has(name) ? Number(query.get(name)) : undefined);
  const model = query.get('model') ?? 'fake';
  return {
    model,
    messages: messages.map((message) => ({
      role: message.role,
      content: message.parts
        .filter((part) => part.type === 'text')
        .map((part) => part.text)
        .join(''),
    })),
    max_tokens: number('max_tokens'),
    fake:
      model === 'fake'
        ? { seed: number('seed'), tokens_per_second: number('tokens_per_second') }
        : undefined,
  };
}

/**
 * `DefaultChatTransport` reads the broker's stream and validates every chunk (its
 * `processResponseStream`: `parseJsonEventStream` + `uiMessageChunkSchema`). Only the way a
 * message is sent differs: create a generation, remember its id, then read its events.
 */
class BrokerChatTransport extends DefaultChatTransport {
  constructor() {
    super({
      // The reconnect URL: the stored stream's events, from the start (a full replay).
      prepareReconnectToStreamRequest: ({ id }) => ({ api: eventsUrl(saved.load(id).streamId) }),
    });
  }

  async sendMessages({ chatId, messages, abortSignal }) {
    const response = await fetch('/v1/streams', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(createRequest(messages)),
      signal: abortSignal,
    });
    if (!response.ok) {
      throw new Error(`POST /v1/streams answered ${response.status}: ${await response.text()}`);
    }
    const { id } = await response.json();
    saved.store(chatId, { streamId: id, messages });
    // A new stream is read the same way as a resumed one.
    const stream = await this.reconnectToStream({ chatId, abortSignal });
    if (stream == null) throw new Error(`stream ${id} has no events`);
    return stream;
  }

  async reconnectToStream(options) {
    if (saved.load(options.chatId) == null) return null; // no stream: nothing to resume
    return super.reconnectToStream(options); // null when the broker answers 204
  }
}

// ---------------------------------------------------------------------------- chat state

/**
 * The chat's state as the SDK's framework bindings keep it (React's, Vue's…): plain fields,
 * messages replaced (never mutated) on every change, and a callback that re-renders.
 */
class DomChatState {
  constructor(onChange) {
    this.onChange = onChange;
    this.fields = { status: 'ready', error: undefined, messages: [] };
  }

  get status() { return this.fields.status; }
  set status(status) { this.update({ status }); }
  get error() { return this.fields.error; }
  set error(error) { this.update({ error }); }
  get messages() { return this.fields.messages; }
  set messages(messages) { this.update({ messages: [...messages] }); }

  pushMessage = (message) => { this.messages = [...this.messages, message]; };
  popMessage = () => { this.messages = this.messages.slice(0, -1); };
  replaceMessage = (index, message) => {
    // The SDK keeps writing into `message` as chunks arrive: store a copy.
    this.messages = this.messages.with(index, this.snapshot(message));
  };
  snapshot = (thing) => structuredClone(thing);

  update(fields) {
    this.fields = { ...this.fields, ...fields };
    this.onChange();
  }
}

class Chat extends AbstractChat {
  constructor({ onChange, ...init }) {
    super({ ...init, state: new DomChatState(onChange) });
  }
}

// ---------------------------------------------------------------------------- the page

const $ = (selector) => document.querySelector(selector);
let frame; // at most one render per animation frame, however many chunks arrive
let disconnects = 0;

const chat = new Chat({
  id: CHAT_ID,
  transport: new BrokerChatTransport(),
  onChange: () => {
    frame ??= requestAnimationFrame(() => {
      frame = undefined;
      render();
    });
  },
  onError: (error) => console.error('chat error:', error),
  // The broker's progress: a transient data part, given to onData, not kept in the message.
  onData: (part) => {
    if (part.type === 'data-progress') $('#progress').textContent = `${part.data.tokens} tokens`;
  },
  onFinish: ({ isDisconnect }) => {
    // The network dropped mid-answer (not a reload, not an error from the broker): read the
    // stream again, as `useChat({ resume: true })` does when a tab becomes visible again.
    // A full replay: the SDK rebuilds the message from its `start` chunk, nothing doubled.
    // At most 5 times per message: a network that cuts every replay at the same byte would
    // never let it get further.
    if (isDisconnect && disconnects++ < 5) setTimeout(() => chat.resumeStream());
  },
});
window.chat = chat; // for the devtools console (and the browser test)

function render() {
  $('#status').textContent = chat.status;
  $('#error').textContent = chat.error?.message ?? '';
  $('#messages').replaceChildren(
    ...chat.messages.map((message) => {
      const item = document.createElement('li');
      item.dataset.role = message.role;
      item.dataset.id = message.id;
      // The broker's `finish` chunk puts its finish reason in the message's metadata.
      item.dataset.finishReason = message.metadata?.finish_reason ?? '';
      item.textContent = message.parts
        .filter((part) => part.type === 'text')
        .map((part) => part.text)
        .join('');
      return item;
    }),
  );
  $('#send').disabled = chat.status === 'submitted' || chat.status === 'streaming';
}

$('#composer').addEventListener('submit', (event) => {
  event.preventDefault();
  const prompt = event.target.elements.prompt;
  disconnects = 0;
  chat.sendMessage({ text: prompt.value });
  prompt.value = '';
});

// A reload: show the conversation as sent and read its answer again, from the start.
const conversation = saved.load(CHAT_ID);
if (conversation != null) {
  chat.messages = conversation.messages;
  chat.resumeStream();
}
render();
