"""Python client libraries nobody here wrote, unchanged, against a live broker (Redis, an
api process, a worker, and the local OpenAI-compatible upstream for ``echo-model`` and
``tool-model``): the ``openai`` SDK's extras (tests/test_openai_compat.py covers its plain
use): the stream helper and ``ChatCompletionStreamState`` over live and resumed streams, a
read that survives a proxy cutting its connections by resuming from the chunks' ``event_id``
(sync and async), and ``models.list()``.

Answers are compared with the exact text of the deterministic ``fake`` model (or the
upstream's scripted tool calls), never with what another client of the same broker received.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai
import pytest
from openai.lib.streaming.chat import (
    ChatCompletionStreamState,
    ChunkEvent,
    ContentDeltaEvent,
    ContentDoneEvent,
    FunctionToolCallArgumentsDoneEvent,
)
from openai.types.chat import ChatCompletionChunk

from tests.support.browser import ThreadedChaosProxy
from tests.support.client_libraries import (
    CUT_RATE,
    PING_RATE,
    PROMPT,
    PROMPT_TOKENS,
    TOOLS,
    UpstreamBroker,
    event_id,
    fake,
)
from tests.support.generations import expected_text
from tests.support.openai_answers import TOOL_CALLS
from tests.support.resuming import (
    Resumed,
    aread_resuming,
    assert_strictly_increasing,
    read_resuming,
)

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


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


def test_the_sdk_stream_helper_accumulates_a_live_stream(broker: UpstreamBroker) -> None:
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


def test_the_sdk_stream_helper_assembles_tool_calls(broker: UpstreamBroker) -> None:
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
    broker: UpstreamBroker, model: str, include_usage: bool
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


def test_the_sdk_reads_through_a_cutting_proxy_by_resuming_from_event_ids(
    broker: UpstreamBroker,
) -> None:
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
async def test_the_async_sdk_reads_through_a_cutting_proxy_by_resuming(
    broker: UpstreamBroker,
) -> None:
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


def test_the_sdk_lists_models_as_openai_model_objects(broker: UpstreamBroker) -> None:
    """``models.list()``: OpenAI model objects (``object``, an integer ``created``,
    ``owned_by``) for the fake and the upstream's models."""
    with broker.sdk() as sdk:
        models = {model.id: model for model in sdk.models.list()}
    for name in ("fake", "echo-model", "tool-model"):
        assert models[name].object == "model"
        assert isinstance(models[name].created, int)
        assert models[name].owned_by
