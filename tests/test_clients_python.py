"""Python client libraries nobody here wrote, unchanged, against a live broker (Redis, an api
process, a worker, and the local OpenAI-compatible upstream for ``echo-model``/``tool-model``).

- the ``openai`` SDK's extras (tests/test_openai_compat.py covers its plain use): the stream
  helper and ``ChatCompletionStreamState`` over live and resumed streams, and a read that
  survives a proxy cutting its connections by resuming from the chunks' ``event_id``;
- ``langchain-openai``'s ``ChatOpenAI``: invoke, stream, tools, async, failures;
- ``litellm``: completion and acompletion, streamed or not, tools, ``stream_chunk_builder``;
- ``httpx-sse``: the loop of its README over every wire format, and resuming with ``sse.id``;
- ``sseclient-py``: the broker's and OpenAI's formats, and resuming with ``event.id``.

Answers are compared with the exact text of the deterministic ``fake`` model (or the upstream's
scripted tool calls), never with what another client of the same broker received.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

# litellm must read its model price map from its own package, not fetch it: nothing here may
# leave the machine. It reads this variable when it is imported.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import httpx
import litellm
import openai
import pytest
import sseclient
from httpx_sse import ServerSentEvent, connect_sse
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI
from openai.lib.streaming.chat import (
    ChatCompletionStreamState,
    ChunkEvent,
    ContentDeltaEvent,
    ContentDoneEvent,
    FunctionToolCallArgumentsDoneEvent,
)
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageParam,
)
from pydantic import BaseModel, SecretStr

from tests.support.browser import ThreadedChaosProxy
from tests.support.generations import MESSAGES, create_stream, expected_text, stream_state
from tests.support.openai_server import TOOL_CALLS, OpenAIServer
from tests.support.processes import (
    ApiProcess,
    broker_on_upstream,
)
from tests.support.redis_server import RedisServer
from tests.support.resuming import (
    Resumed,
    aread_resuming,
    assert_strictly_increasing,
    read_resuming,
)

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

# litellm prints a "Provider List" banner when it looks up the provider of a model name it
# does not know (the upstream's "fake"); the lookup's failure is handled, the banner is noise.
litellm.suppress_debug_info = True

#: ``MESSAGES`` typed for the SDK (the fake's text depends on the messages: they must match).
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": MESSAGES[0]["content"]}]
#: Words in the prompt: the fake's (and the upstream's) ``prompt_tokens``.
PROMPT_TOKENS = 5
#: Fast enough that a test does not wait; slow enough that tokens come in several events.
FAST = 2000.0
#: For streams cut many times: a few hundred ms of live streaming while the proxy cuts.
CUT_RATE = 80.0
#: Slower than the heartbeat (BROKER_HEARTBEAT_SECONDS=0.3): pings come between tokens.
PING_RATE = 2.5
#: The tools of ``tool-model``'s calls, as an OpenAI request declares them.
TOOLS: list[ChatCompletionFunctionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {
                "type": "object",
                "properties": {key: {"type": "string"} for key in json.loads(arguments)},
            },
        },
    }
    for _, name, arguments in TOOL_CALLS
]


@dataclass
class Broker:
    api: ApiProcess
    upstream: OpenAIServer

    @property
    def v1(self) -> str:
        return f"{self.api.url}/v1"

    def sdk(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key="unused", **options)

    def create(self, *, max_tokens: int, seed: int, rate: float) -> str:
        """A fake-model generation made with ``POST /v1/streams``; its id."""
        return str(create_stream(self.api.url, max_tokens=max_tokens, seed=seed, rate=rate)["id"])

    def state(self, stream_id: str) -> dict[str, Any]:
        return stream_state(self.api.url, stream_id)


@pytest.fixture(scope="module")
def broker(redis_server: RedisServer) -> Iterator[Broker]:
    with broker_on_upstream(redis_server.url) as (api, upstream):
        yield Broker(api, upstream)


def fake(seed: int, rate: float = FAST) -> dict[str, Any]:
    """The fake model's options, as ``extra_body``."""
    return {"fake": {"seed": seed, "tokens_per_second": rate}}


def event_id(chunk: BaseModel) -> str:
    """The broker's ``event_id`` of a chunk (an extra field: the SDKs keep unknown fields)."""
    value = (chunk.model_extra or {}).get("event_id")
    assert isinstance(value, str), f"a chunk without an event_id: {chunk!r}"
    return value


def accumulate(chunks: list[ChatCompletionChunk]) -> ChatCompletionStreamState[None]:
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(chunk)
    return state


def content_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def resume_params(include_usage: bool) -> dict[str, str]:
    return {"format": "openai", **({"include_usage": "true"} if include_usage else {})}


def resume(
    sdk: openai.OpenAI, stream_id: str, last: str | None, *, include_usage: bool = False
) -> openai.Stream[ChatCompletionChunk]:
    """The events URL in OpenAI's format, parsed by the SDK's own ``Stream``."""
    return sdk.get(
        f"/streams/{stream_id}/events",
        cast_to=ChatCompletionChunk,
        stream=True,
        stream_cls=openai.Stream[ChatCompletionChunk],
        options={
            "headers": {"Last-Event-ID": last} if last else {},
            "params": resume_params(include_usage),
        },
    )


async def aresume(
    sdk: openai.AsyncOpenAI, stream_id: str, last: str | None, *, include_usage: bool = False
) -> openai.AsyncStream[ChatCompletionChunk]:
    return await sdk.get(
        f"/streams/{stream_id}/events",
        cast_to=ChatCompletionChunk,
        stream=True,
        stream_cls=openai.AsyncStream[ChatCompletionChunk],
        options={
            "headers": {"Last-Event-ID": last} if last else {},
            "params": resume_params(include_usage),
        },
    )


def assert_resumed_answer(read: Resumed[ChatCompletionChunk], *, seed: int, tokens: int) -> None:
    """What an SDK user resuming from ``event_id`` ends with: each resumed connection opens
    with a role chunk whose ``event_id`` is the resume point (the user has that id already
    and drops it); every other chunk comes once, in order; together they accumulate to the
    whole answer."""
    assert read.cuts > 0, "no connection was cut: the test proved nothing"
    kept: list[ChatCompletionChunk] = []
    for connection in read.connections:
        chunks = connection.received
        if connection.resumed_from is not None and chunks:
            lead, *chunks = chunks
            assert lead.choices[0].delta.role == "assistant"
            assert event_id(lead) == connection.resumed_from
        kept += chunks
    assert_strictly_increasing([event_id(chunk) for chunk in kept])
    final = accumulate(kept).get_final_completion()
    assert final.choices[0].message.role == "assistant"
    assert final.choices[0].message.content == expected_text(tokens, seed=seed)
    assert final.choices[0].finish_reason == "stop"
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (PROMPT_TOKENS, tokens)


# -- the openai SDK's extras -------------------------------------------------------------------


def test_the_sdk_stream_helper_accumulates_a_live_stream(broker: Broker) -> None:
    """``client.chat.completions.stream()`` over a stream slow enough for heartbeats to come
    between its tokens (the SDK's decoder would choke on a ``: ping`` that formed an empty
    event): its content deltas add up to the exact text, its ``content.done`` and final
    completion have the role, the text, ``finish_reason`` and the usage, and every chunk
    carries an ``event_id``, increasing."""
    with (
        broker.sdk() as sdk,
        sdk.chat.completions.stream(
            model="fake",
            messages=PROMPT,
            max_tokens=4,
            stream_options={"include_usage": True},
            extra_body=fake(seed=11, rate=PING_RATE),
        ) as stream,
    ):
        events = list(stream)
        final = stream.get_final_completion()
    text = expected_text(4, seed=11)
    assert "".join(e.delta for e in events if isinstance(e, ContentDeltaEvent)) == text
    assert [e.content for e in events if isinstance(e, ContentDoneEvent)] == [text]
    message = final.choices[0].message
    assert (message.role, message.content) == ("assistant", text)
    assert final.choices[0].finish_reason == "stop"
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (PROMPT_TOKENS, 4)
    chunks = [e.chunk for e in events if isinstance(e, ChunkEvent)]
    assert len(chunks) > 4  # role, tokens in more than one chunk, finish, usage
    assert_strictly_increasing([event_id(chunk) for chunk in chunks])


def test_the_sdk_stream_helper_assembles_tool_calls(broker: Broker) -> None:
    """``tool-model`` through the broker, read with the stream helper: one
    ``tool_calls.function.arguments.done`` event per call with its whole arguments, and the
    final message's calls (id, name, arguments) as the upstream made them."""
    with (
        broker.sdk() as sdk,
        sdk.chat.completions.stream(model="tool-model", messages=PROMPT, tools=TOOLS) as stream,
    ):
        events = list(stream)
        final = stream.get_final_completion()
    done = [
        (e.name, e.arguments) for e in events if isinstance(e, FunctionToolCallArgumentsDoneEvent)
    ]
    assert done == [(name, arguments) for _, name, arguments in TOOL_CALLS]
    calls = [
        (c.id, c.function.name, c.function.arguments)
        for c in final.choices[0].message.tool_calls or []
    ]
    assert calls == list(TOOL_CALLS)
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("model", "include_usage"),
    [("fake", False), ("fake", True), ("tool-model", True)],
)
def test_resuming_after_any_chunk_gives_the_sdk_exactly_the_chunks_that_follow(
    broker: Broker, model: str, include_usage: bool
) -> None:
    """After every chunk of an answer, the events URL in OpenAI's format with ``Last-Event-ID:
    <its event_id>``, read by the SDK's own ``Stream``: a role chunk (``event_id`` = the
    resume point), then exactly the chunks the live stream had after that one. A fresh
    ``ChatCompletionStreamState`` accepts the resumed stream alone (role "assistant", the rest
    of the text, the finish reason); one fed the chunks before the cut and the resumed ones
    after the role chunk ends with the same completion as the unbroken stream (tool calls
    included)."""
    with broker.sdk() as sdk:
        live = list(
            sdk.chat.completions.create(
                model=model,
                messages=PROMPT,
                stream=True,
                stream_options={"include_usage": include_usage},
                max_tokens=16,
                extra_body=fake(seed=12, rate=400) if model == "fake" else None,
            )
        )
        stream_id = live[0].id.removeprefix("chatcmpl-")
        whole = accumulate(live).get_final_completion()
        for k, chunk in enumerate(live):
            lead, *rest = resume(sdk, stream_id, event_id(chunk), include_usage=include_usage)
            assert lead.choices[0].delta.role == "assistant"
            assert event_id(lead) == event_id(chunk)
            assert [c.model_dump() for c in rest] == [c.model_dump() for c in live[k + 1 :]]
            continued = accumulate([*live[: k + 1], *rest]).get_final_completion()
            assert continued.model_dump() == whole.model_dump()
            if model == "fake":
                # (A fresh accumulator cannot start inside tool calls: the SDK's raises
                # IndexError on a first delta of call 1 without call 0.)
                alone = accumulate([lead, *rest]).get_final_completion().choices[0]
                assert alone.message.role == "assistant"
                assert (alone.message.content or "") == content_of(live[k + 1 :])
                finishes = [c.choices[0].finish_reason for c in rest if c.choices]
                assert alone.finish_reason == next((f for f in finishes if f), None)
    message = whole.choices[0].message
    if model == "fake":
        assert message.content == expected_text(16, seed=12)
    else:
        calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
        assert calls == list(TOOL_CALLS)
    assert whole.choices[0].finish_reason == ("stop" if model == "fake" else "tool_calls")
    assert (whole.usage is not None) == include_usage


def test_the_sdk_reads_through_a_cutting_proxy_by_resuming_from_event_ids(broker: Broker) -> None:
    """A proxy cuts the SDK's connections every few hundred bytes; the user resumes each time
    from the last chunk's ``event_id`` (the SDK's ``Stream`` over the events URL) until the
    SDK sees ``[DONE]``: the exact text, usage and finish reason, no chunk twice."""
    with (
        ThreadedChaosProxy(broker.api.port, cut_after=(450, 1400), seed=1) as proxy,
        openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0) as sdk,
    ):
        stream_id: str | None = None

        def connect(last: str | None) -> Iterator[ChatCompletionChunk]:
            nonlocal stream_id
            if stream_id is None:
                # The first 450 bytes always pass: the headers (and the stream id) arrive.
                raw = sdk.chat.completions.with_raw_response.create(
                    model="fake",
                    messages=PROMPT,
                    max_tokens=40,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=fake(seed=13, rate=CUT_RATE),
                )
                stream_id = raw.headers["x-stream-id"]
                return iter(raw.parse())
            return iter(resume(sdk, stream_id, last, include_usage=True))

        read = read_resuming(connect, event_id, cut_errors=(openai.APIConnectionError,))
    assert proxy.cuts >= read.cuts
    assert_resumed_answer(read, seed=13, tokens=40)


@pytest.mark.anyio
async def test_the_async_sdk_reads_through_a_cutting_proxy_by_resuming(broker: Broker) -> None:
    """The same with ``AsyncOpenAI`` and ``AsyncStream``: every cut resumed from the last
    ``event_id``, the whole answer exactly once."""
    # The proxy on a thread and loop of its own: closing it cancels none of this loop's tasks.
    with ThreadedChaosProxy(broker.api.port, cut_after=(450, 1400), seed=2) as proxy:
        async with openai.AsyncOpenAI(
            base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0
        ) as sdk:
            stream_id: str | None = None

            async def connect(last: str | None) -> AsyncIterator[ChatCompletionChunk]:
                nonlocal stream_id
                if stream_id is None:
                    raw = await sdk.chat.completions.with_raw_response.create(
                        model="fake",
                        messages=PROMPT,
                        max_tokens=40,
                        stream=True,
                        stream_options={"include_usage": True},
                        extra_body=fake(seed=14, rate=CUT_RATE),
                    )
                    stream_id = raw.headers["x-stream-id"]
                    return raw.parse().__aiter__()
                return (await aresume(sdk, stream_id, last, include_usage=True)).__aiter__()

            read = await aread_resuming(connect, event_id, cut_errors=(openai.APIConnectionError,))
    assert proxy.cuts >= read.cuts
    assert_resumed_answer(read, seed=14, tokens=40)


def test_the_sdk_lists_models_as_openai_model_objects(broker: Broker) -> None:
    """``models.list()``: OpenAI model objects (``object``, an integer ``created``,
    ``owned_by``) for the fake and the upstream's models."""
    with broker.sdk() as sdk:
        models = {model.id: model for model in sdk.models.list()}
    for name in ("fake", "echo-model", "tool-model"):
        assert models[name].object == "model"
        assert isinstance(models[name].created, int)
        assert models[name].owned_by


# -- langchain-openai --------------------------------------------------------------------------


def chat_model(broker: Broker, model: str = "fake", **options: Any) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=broker.v1, api_key=SecretStr("unused"), model=model, max_retries=0, **options
    )


def joined(parts: list[AIMessageChunk]) -> AIMessageChunk:
    """LangChain's own way of putting a streamed message together: ``+``."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def assert_usage(message: AIMessage, tokens: int) -> None:
    usage = message.usage_metadata
    assert usage is not None
    assert (usage["input_tokens"], usage["output_tokens"]) == (PROMPT_TOKENS, tokens)
    assert usage["total_tokens"] == PROMPT_TOKENS + tokens


def test_langchain_invoke_gets_text_usage_and_finish_reason(broker: Broker) -> None:
    """``ChatOpenAI(base_url=…).invoke``: the exact text, ``usage_metadata``, and
    ``response_metadata`` with the finish reason and model; its ``id`` names a broker stream
    that holds the same answer."""
    message = chat_model(broker, max_tokens=18, extra_body=fake(seed=21)).invoke(MESSAGES)
    assert message.content == expected_text(18, seed=21)
    assert_usage(message, 18)
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.response_metadata["model_name"] == "fake"
    stream_id = message.response_metadata["id"].removeprefix("chatcmpl-")
    assert broker.state(stream_id)["text"] == message.content


def test_langchain_stream_gets_text_in_pieces_and_usage(broker: Broker) -> None:
    """``.stream`` with ``stream_usage=True``: pieces that join to the exact text, the usage
    and the finish reason; with ``include_response_headers`` the first piece carries the
    broker's ``x-stream-id`` (LangChain exposes no per-chunk ``event_id`` to resume from)."""
    llm = chat_model(
        broker,
        max_tokens=30,
        extra_body=fake(seed=22, rate=400),
        stream_usage=True,
        include_response_headers=True,
    )
    parts = list(llm.stream(MESSAGES))
    assert len([p for p in parts if p.content]) > 2
    whole = joined(parts)
    assert whole.content == expected_text(30, seed=22)
    assert_usage(whole, 30)
    assert whole.response_metadata["finish_reason"] == "stop"
    stream_id = parts[0].response_metadata["headers"]["x-stream-id"]
    assert broker.state(stream_id)["text"] == whole.content


def get_weather(city: str, unit: str) -> str:
    """The weather in a city (never called: the model only asks for it)."""
    raise NotImplementedError


def get_time(timezone: str) -> str:
    """The time in a timezone (never called)."""
    raise NotImplementedError


@pytest.mark.parametrize("how", ["invoke", "stream"])
def test_langchain_bind_tools_gets_the_upstream_tool_calls(broker: Broker, how: str) -> None:
    """``.bind_tools`` with ``tool-model``: the tools reach the upstream through the broker,
    and LangChain parses its calls (ids, names, arguments as dicts), invoked or streamed."""
    llm = chat_model(broker, "tool-model").bind_tools([get_weather, get_time])
    if how == "invoke":
        message = llm.invoke(MESSAGES)
    else:
        parts = list(llm.stream(MESSAGES))
        assert all(isinstance(part, AIMessageChunk) for part in parts)
        message = joined([part for part in parts if isinstance(part, AIMessageChunk)])
    assert isinstance(message, AIMessage)
    assert [(c["id"], c["name"], c["args"]) for c in message.tool_calls] == [
        (call_id, name, json.loads(arguments)) for call_id, name, arguments in TOOL_CALLS
    ]
    assert message.response_metadata["finish_reason"] == "tool_calls"
    sent = [tool["function"]["name"] for tool in broker.upstream.last_body["tools"]]
    assert sent == ["get_weather", "get_time"]


@pytest.mark.anyio
async def test_langchain_ainvoke_and_astream(broker: Broker) -> None:
    """The async pair, ``.ainvoke`` and ``.astream``: the same exact text and usage."""
    llm = chat_model(broker, max_tokens=14, extra_body=fake(seed=23), stream_usage=True)
    message = await llm.ainvoke(MESSAGES)
    parts = [part async for part in llm.astream(MESSAGES)]
    whole = joined(parts)
    assert message.content == whole.content == expected_text(14, seed=23)
    assert_usage(message, 14)
    assert_usage(whole, 14)
    assert whole.response_metadata["finish_reason"] == "stop"


def test_langchain_raises_the_broker_failure(broker: Broker) -> None:
    """A generation that fails after some tokens: ``.invoke`` and ``.stream`` both raise an
    ``openai.APIError`` with the broker's message (not a partial answer)."""
    failing = {"fake": {"fail_after_tokens": 3, "tokens_per_second": FAST}}
    llm = chat_model(broker, max_tokens=10, extra_body=failing)
    with pytest.raises(openai.APIError, match="the fake model failed after 3 tokens"):
        llm.invoke(MESSAGES)
    with pytest.raises(openai.APIError, match="the fake model failed after 3 tokens"):
        list(llm.stream(MESSAGES))


# -- litellm -----------------------------------------------------------------------------------


#: Warnings litellm's own code raises (the suite turns warnings into errors): pydantic's on
#: litellm's ``ReadOnly`` TypedDicts, imported on the first call, and on litellm's streaming
#: reading ``model_fields`` from an instance.
litellm_warnings = pytest.mark.filterwarnings(
    "ignore:Item.* on TypedDict class .* using the `ReadOnly` qualifier:UserWarning",
    "ignore:Accessing the 'model_(computed_)?fields' attribute on the instance:DeprecationWarning",
)


def litellm_options(broker: Broker) -> dict[str, Any]:
    """Where litellm's ``openai/`` provider sends requests: the broker, nowhere else."""
    return {"api_base": broker.v1, "api_key": "unused", "max_retries": 0}


def streamed_text(chunks: list[litellm.ModelResponseStream]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def usage_of(response: litellm.ModelResponse) -> litellm.Usage:
    """A response's usage (litellm sets it as an extra field of its pydantic model)."""
    usage = (response.model_extra or {}).get("usage")
    assert isinstance(usage, litellm.Usage), f"no usage in {response!r}"
    return usage


@litellm_warnings
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_litellm_completion_gets_text_finish_reason_and_usage(broker: Broker, stream: bool) -> None:
    """``litellm.completion(model="openai/fake", api_base=…)``: the exact text, ``stop`` and
    the usage; streamed, the chunks keep the broker's ``event_id`` (increasing; not the usage
    chunk, which litellm makes anew) and ``stream_chunk_builder`` rebuilds the whole response
    from them."""
    request: dict[str, Any] = {
        "model": "openai/fake",
        "messages": MESSAGES,
        "max_tokens": 16,
        "extra_body": fake(seed=31, rate=400),
        **litellm_options(broker),
    }
    text = expected_text(16, seed=31)
    if stream:
        chunks = list(
            litellm.completion(**request, stream=True, stream_options={"include_usage": True})
        )
        assert streamed_text(chunks) == text
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert [f for f in finishes if f] == ["stop"]
        # litellm passes the broker's extra field on, except on the usage chunk it rebuilds.
        assert_strictly_increasing([event_id(c) for c in chunks if c.choices])
        response = litellm.stream_chunk_builder(chunks, messages=MESSAGES)
        assert isinstance(response, litellm.ModelResponse)
    else:
        response = litellm.completion(**request)
    assert isinstance(response, litellm.ModelResponse)
    choice = response.choices[0]
    assert isinstance(choice, litellm.Choices)
    assert choice.message.content == text
    assert choice.finish_reason == "stop"
    usage = usage_of(response)
    assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, 16)


@litellm_warnings
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_litellm_gets_the_upstream_tool_calls(broker: Broker, stream: bool) -> None:
    """``openai/tool-model`` with tools: litellm's tool calls (ids, names, arguments) are the
    upstream's, ``finish_reason`` is ``tool_calls``; streamed and rebuilt with
    ``stream_chunk_builder``, the usage is the upstream's (21 completion tokens)."""
    request: dict[str, Any] = {
        "model": "openai/tool-model",
        "messages": MESSAGES,
        "tools": TOOLS,
        **litellm_options(broker),
    }
    if stream:
        chunks = list(
            litellm.completion(**request, stream=True, stream_options={"include_usage": True})
        )
        response = litellm.stream_chunk_builder(chunks, messages=MESSAGES)
    else:
        response = litellm.completion(**request)
    assert isinstance(response, litellm.ModelResponse)
    choice = response.choices[0]
    assert isinstance(choice, litellm.Choices)
    calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    assert calls == list(TOOL_CALLS)
    assert choice.finish_reason == "tool_calls"
    assert usage_of(response).completion_tokens == 21


@litellm_warnings
@pytest.mark.anyio
async def test_litellm_acompletion_streams(broker: Broker) -> None:
    """``litellm.acompletion(stream=True)``: the exact text and finish reason, and
    ``stream_chunk_builder`` gives back the usage."""
    response = await litellm.acompletion(
        model="openai/fake",
        messages=MESSAGES,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=fake(seed=32),
        **litellm_options(broker),
    )
    assert isinstance(response, litellm.CustomStreamWrapper)
    chunks = [chunk async for chunk in response]
    assert streamed_text(chunks) == expected_text(12, seed=32)
    rebuilt = litellm.stream_chunk_builder(chunks, messages=MESSAGES)
    assert isinstance(rebuilt, litellm.ModelResponse)
    assert rebuilt.choices[0].finish_reason == "stop"
    assert usage_of(rebuilt).completion_tokens == 12


@litellm_warnings
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_litellm_raises_the_broker_failure(broker: Broker, stream: bool) -> None:
    """A generation that fails after some tokens raises litellm's exception (an
    ``openai.APIError``) carrying the broker's message."""
    failing = {"fake": {"fail_after_tokens": 3, "tokens_per_second": FAST}}
    request: dict[str, Any] = {
        "model": "openai/fake",
        "messages": MESSAGES,
        "max_tokens": 10,
        "extra_body": failing,
        **litellm_options(broker),
    }

    def answer() -> object:
        if stream:
            return list(litellm.completion(**request, stream=True))
        return litellm.completion(**request)

    with pytest.raises(openai.APIError, match="the fake model failed after 3 tokens"):
        answer()


# -- what the SSE libraries' tests share -------------------------------------------------------


class SSE(Protocol):
    """What httpx-sse's ``ServerSentEvent`` and sseclient-py's ``Event`` both have."""

    @property
    def event(self) -> str: ...
    @property
    def data(self) -> str: ...
    @property
    def id(self) -> str | None: ...


SSEType = TypeVar("SSEType", bound=SSE)


def answer_text(wire: str, events: list[tuple[str, dict[str, Any]]]) -> str:
    """The text of an answer from its (event, data) pairs in format ``wire``."""
    if wire == "broker":
        return "".join(data["text"] for event, data in events if event == "token")
    if wire == "ai-sdk":
        return "".join(data["delta"] for _, data in events if data["type"] == "text-delta")
    return "".join(
        choice["delta"].get("content") or "" for _, data in events for choice in data["choices"]
    )


def event_pairs(events: list[SSEType]) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each event but ``[DONE]``."""
    return [(e.event, json.loads(e.data)) for e in events if e.data != "[DONE]"]


def is_last(sse: SSE) -> bool:
    """The last event of a stream, in any format."""
    return sse.event in ("done", "error") or sse.data == "[DONE]"


def each_once(read: Resumed[SSEType], wire: str) -> list[SSEType]:
    """The events of a read across cuts, after checking that each came once, in order: with
    data and an id, ids strictly increasing. In OpenAI's format a resumed connection opens
    with a role chunk that has no SSE id and the resume point as ``event_id`` (checked, then
    dropped: the client has that id)."""
    assert read.cuts > 0, "no connection was cut: the test proved nothing"
    kept: list[SSEType] = []
    for connection in read.connections:
        events = connection.received
        if wire == "openai" and connection.resumed_from is not None and events:
            lead, *events = events
            assert not lead.id
            chunk = json.loads(lead.data)
            assert chunk["choices"][0]["delta"]["role"] == "assistant"
            assert chunk["event_id"] == connection.resumed_from
        kept += events
    assert all(e.data and e.id for e in kept)
    assert_strictly_increasing([e.id or "" for e in kept])
    return kept


def assert_whole_answer(wire: str, events: list[SSEType], text: str) -> None:
    """The exact text, the stream's opening and its end, in format ``wire``."""
    pairs = event_pairs(events)
    assert answer_text(wire, pairs) == text
    if wire == "broker":
        assert [event for event, _ in pairs].count("metadata") == 1
        assert (events[0].event, events[-1].event) == ("metadata", "done")
        assert pairs[-1][1]["finish_reason"] == "stop"
    else:
        assert events[-1].data == "[DONE]"
        assert len(pairs) == len(events) - 1
    if wire == "ai-sdk":
        assert (pairs[0][1]["type"], pairs[-1][1]["type"]) == ("start", "finish")
        assert pairs[-1][1]["finishReason"] == "stop"
    if wire == "openai":
        assert pairs[-1][1]["choices"][0]["finish_reason"] == "stop"
        assert [data["event_id"] for _, data in pairs] == [e.id for e in events[:-1]]


# -- httpx-sse ---------------------------------------------------------------------------------


class _Copy(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, into: bytearray) -> None:
        self.stream = stream
        self.into = into

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.stream:
            self.into += chunk
            yield chunk

    def close(self) -> None:
        self.stream.close()


class RecordingTransport(httpx.HTTPTransport):
    """httpx's transport, keeping a copy of the response bytes it hands over (what the SSE
    library parsed, as it came)."""

    def __init__(self) -> None:
        super().__init__()
        self.received = bytearray()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _Copy(response.stream, self.received)
        return response


@pytest.mark.parametrize("wire", ["broker", "openai", "ai-sdk", "openai-create"])
def test_the_httpx_sse_readme_loop_reads_every_format(broker: Broker, wire: str) -> None:
    """The loop of httpx-sse's README, ``for sse in event_source.iter_sse():
    json.loads(sse.data)``, unchanged over a live stream with heartbeats between its events,
    in every format (``openai-create``: ``POST /v1/chat/completions`` itself). No event has
    empty data (the opening ``: ping`` and ``retry:`` are not events of their own); ``[DONE]``
    is the only data that is not JSON and ends the loop."""
    transport = RecordingTransport()
    events: list[ServerSentEvent] = []
    with httpx.Client(transport=transport, timeout=30) as client:
        if wire == "openai-create":
            body = {
                "model": "fake",
                "messages": MESSAGES,
                "max_tokens": 3,
                "stream": True,
                **fake(seed=41, rate=PING_RATE),
            }
            source = connect_sse(client, "POST", f"{broker.v1}/chat/completions", json=body)
        else:
            stream_id = broker.create(max_tokens=3, seed=41, rate=PING_RATE)
            url = f"{broker.v1}/streams/{stream_id}/events"
            source = connect_sse(client, "GET", url, params={"format": wire})
        with source as event_source:
            for sse in event_source.iter_sse():
                assert sse.data, f"an event with empty data: {sse!r}"
                events.append(sse)
                if sse.data == "[DONE]":
                    break
                json.loads(sse.data)
    raw = bytes(transport.received)
    assert raw.startswith(b": ping\n")
    first_event = raw.index(b"\n\n")
    assert b": ping\n" in raw[first_event:], "no heartbeat between events: nothing was proved"
    assert_strictly_increasing([sse.id for sse in events])
    assert_whole_answer(wire.removesuffix("-create"), events, expected_text(3, seed=41))
    if wire == "broker":
        assert events[0].retry == 2000
        assert event_pairs(events)[-1][1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("wire", ["broker", "openai", "ai-sdk"])
def test_httpx_sse_resumes_through_a_cutting_proxy_with_sse_id(broker: Broker, wire: str) -> None:
    """httpx-sse through a proxy that cuts every few hundred bytes; after each cut the loop
    reconnects with ``Last-Event-ID: <sse.id>`` of the last event: every event once (ids
    strictly increase), the exact text, the opening and the end of the stream."""
    stream_id = broker.create(max_tokens=40, seed=42, rate=CUT_RATE)
    with (
        ThreadedChaosProxy(broker.api.port, cut_after=(350, 900), seed=3) as proxy,
        httpx.Client(timeout=30) as client,
    ):
        url = f"{proxy.url}/v1/streams/{stream_id}/events"

        def connect(last: str | None) -> Iterator[ServerSentEvent]:
            headers = {"Last-Event-ID": last} if last else {}
            params = {"format": wire}
            with connect_sse(client, "GET", url, params=params, headers=headers) as source:
                if source.response.status_code == 204:
                    return  # the client has the end already
                for sse in source.iter_sse():
                    yield sse
                    if is_last(sse):
                        return

        read = read_resuming(
            connect, lambda sse: sse.id or None, cut_errors=(httpx.TransportError,)
        )
    assert proxy.cuts >= read.cuts
    assert_whole_answer(wire, each_once(read, wire), expected_text(40, seed=42))


# -- sseclient-py ------------------------------------------------------------------------------


def sseclient_events(response: httpx.Response) -> Iterator[sseclient.Event]:
    """sseclient-py over an httpx streaming response (it takes any iterator of bytes)."""
    return sseclient.SSEClient(response.iter_bytes()).events()


@pytest.mark.parametrize("wire", ["broker", "openai"])
def test_sseclient_reads_every_event_with_its_data_and_id(broker: Broker, wire: str) -> None:
    """sseclient-py over a live stream with heartbeats: every event it dispatches has data and
    an id, the ids increase, the text is exact; in OpenAI's format ``[DONE]`` comes last and
    each chunk's ``event_id`` is its SSE id; in the broker's, the first event has ``retry``."""
    stream_id = broker.create(max_tokens=3, seed=51, rate=PING_RATE)
    url = f"{broker.v1}/streams/{stream_id}/events"
    with (
        httpx.Client(timeout=30) as client,
        client.stream("GET", url, params={"format": wire}) as response,
    ):
        events = list(sseclient_events(response))
    assert all(e.data and e.id for e in events)
    assert_strictly_increasing([e.id or "" for e in events])
    assert_whole_answer(wire, events, expected_text(3, seed=51))
    if wire == "broker":
        assert events[0].retry == "2000"


@pytest.mark.parametrize("wire", ["broker", "openai"])
def test_sseclient_resumes_after_cuts_with_event_id(broker: Broker, wire: str) -> None:
    """sseclient-py through the cutting proxy, reconnecting with ``Last-Event-ID:
    <event.id>`` of the last event it dispatched: the exact text, every event once. (In
    OpenAI's format sseclient gives the id-less role chunk of a resumed connection
    ``id=None``, which leaves the resume point where it is.)"""
    stream_id = broker.create(max_tokens=40, seed=52, rate=CUT_RATE)
    with (
        ThreadedChaosProxy(broker.api.port, cut_after=(350, 1000), seed=4) as proxy,
        httpx.Client(timeout=30) as client,
    ):
        url = f"{proxy.url}/v1/streams/{stream_id}/events"

        def connect(last: str | None) -> Iterator[sseclient.Event]:
            headers = {"Last-Event-ID": last} if last else {}
            with client.stream("GET", url, params={"format": wire}, headers=headers) as response:
                if response.status_code == 204:
                    return
                for event in sseclient_events(response):
                    yield event
                    if is_last(event):
                        return

        read = read_resuming(connect, lambda event: event.id, cut_errors=(httpx.TransportError,))
    assert proxy.cuts >= read.cuts
    assert_whole_answer(wire, each_once(read, wire), expected_text(40, seed=52))
