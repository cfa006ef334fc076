"""Node.js client libraries nobody here wrote, unchanged, against a live broker (Redis, an api
process, a worker, and the local OpenAI-compatible upstream for ``echo-model``/``tool-model``).

Each case runs a script of ``tests/clients/node`` with the pinned Node 22 and libraries
(``package-lock.json``), which prints what the library observed; the assertions are here:

- ``openai``: streamed and whole answers, usage, finish reasons, tool calls, the
  ``chat.completions.stream()`` helper, ``models.list()``, and a read through a proxy that cuts
  every connection, resumed from the chunks' ``event_id`` with the SDK's own SSE parsing;
- ``ai`` + ``@ai-sdk/openai-compatible``: ``streamText``/``generateText``, text and tools;
- ``@langchain/openai``: ``ChatOpenAI`` ``.stream()``/``.invoke()``, ``bindTools``;
- ``eventsource`` and ``@microsoft/fetch-event-source``: the broker's own format and OpenAI's
  through the cutting proxy, resumed by the library with ``Last-Event-ID``;
- ``ai``'s UI message stream readers over ``format=ai-sdk``: live, and across cuts.

Answers are compared with the exact text of the deterministic ``fake`` model (or the
upstream's scripted answers), never with what another client of the same broker received.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support.chaos_proxy import ChaosProxy
from tests.support.generations import expected_text
from tests.support.node import node_or_skip, run_script
from tests.support.openai_server import TOOL_CALLS, OpenAIServer, echo_text
from tests.support.processes import (
    ApiProcess,
    broker_on_upstream,
)
from tests.support.redis_server import RedisServer
from tests.support.resuming import assert_strictly_increasing

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]

#: Words in the prompt (``MESSAGES``): the fake's and the upstream's ``prompt_tokens``.
PROMPT_TOKENS = 5
#: Streams read through the cutting proxy: 60 tokens at 40/s, live for about 1.5 s, so the
#: cuts fall both in the catch-up of recorded events and at the live tail.
CUT_TOKENS = 60
CUT_RATE = 40
#: Bytes a connection carries before the proxy cuts it (response head included): enough for
#: the head and the largest single frame of the format, small enough for many cuts a stream.
NATIVE_CUTS = (300, 900)
OPENAI_CUTS = (400, 1500)
AI_SDK_CUTS = (300, 1000)
#: ``tool-model``'s calls as the AI SDK and LangChain parse them.
TOOL_INPUTS = [(call_id, name, json.loads(arguments)) for call_id, name, arguments in TOOL_CALLS]


@dataclass
class Broker:
    api: ApiProcess
    upstream: OpenAIServer

    async def run(
        self,
        script: str,
        case: str,
        params: dict[str, Any] | None = None,
        proxy: ChaosProxy | None = None,
    ) -> dict[str, Any]:
        """Run a case of ``tests/clients/node/<script>`` (reading through ``proxy`` if given)."""
        via = f"http://127.0.0.1:{proxy.port}" if proxy is not None else None
        return await run_script(script, case, params, broker=self.api.url, proxy=via)

    async def stream_count(self, model: str) -> int:
        """How many generations of ``model`` the broker holds (they fit in one page)."""
        async with httpx.AsyncClient(timeout=30) as client:
            params: dict[str, str | int] = {"limit": 200, "model": model}
            response = await client.get(f"{self.api.url}/v1/streams", params=params)
        response.raise_for_status()
        streams: list[Any] = response.json()["data"]
        assert len(streams) < 200
        return len(streams)

    def cutting(self, cut_after: tuple[int, int], seed: int) -> ChaosProxy:
        """A proxy in front of the api that cuts every connection after ``cut_after`` bytes."""
        return ChaosProxy(self.api.port, cut_after=cut_after, seed=seed)


@pytest.fixture(scope="module")
def broker(redis_server: RedisServer) -> Iterator[Broker]:
    node_or_skip()
    # EventSource waits `retry:` before each reconnect: keep cut streams quick.
    with broker_on_upstream(redis_server.url, {"BROKER_RETRY_MS": "10"}) as (api, upstream):
        yield Broker(api, upstream)


def usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }


def tool_calls_as_openai() -> list[dict[str, str]]:
    return [{"id": i, "name": n, "arguments": a} for i, n, a in TOOL_CALLS]


# -- openai ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "include_usage", "text"),
    [
        ("fake", True, expected_text(20, seed=1)),
        ("fake", False, expected_text(20, seed=1)),
        ("echo-model", True, echo_text(6)),
    ],
    ids=["fake", "fake-no-usage", "upstream"],
)
async def test_openai_streams_the_exact_text_finish_reason_and_usage(
    broker: Broker, model: str, include_usage: bool, text: str
) -> None:
    """``create({stream: true})``: the role chunk first, the exact text, one ``stop``, the
    usage chunk (``choices: []``) exactly when asked for, one completion id, and each chunk's
    ``event_id`` (its SSE id) strictly increasing."""
    tokens = 20 if model == "fake" else 6
    params = {"model": model, "maxTokens": tokens, "seed": 1, "includeUsage": include_usage}
    got = await broker.run("openai.mjs", "stream", params)
    assert got["first_delta"] == {"role": "assistant", "content": ""}
    assert got["text"] == text
    assert got["finish_reasons"] == ["stop"]
    if include_usage:
        assert got["usage"] == usage(tokens)
        assert got["usage_chunk_choices"] == []
    else:
        assert got["usage"] is None
    assert got["ids"] == [f"chatcmpl-{got['stream_id']}"]
    assert got["objects"] == ["chat.completion.chunk"]
    assert_strictly_increasing(got["event_ids"])


@pytest.mark.parametrize("case", ["stream", "complete", "helper"])
async def test_openai_gets_the_upstream_tool_calls(broker: Broker, case: str) -> None:
    """``tool-model``'s two calls (ids, names, arguments split over many deltas) and the
    ``tool_calls`` finish reason: folded from stream deltas, in ``stream: false``'s message,
    and from the ``chat.completions.stream()`` helper (with its arguments.done events)."""
    got = await broker.run("openai.mjs", case, {"model": "tool-model", "tools": True})
    assert got["tool_calls"] == tool_calls_as_openai()
    if case == "stream":
        assert got["finish_reasons"] == ["tool_calls"]
        assert got["text"] == ""
    else:
        assert got["finish_reason"] == "tool_calls"
        assert got["usage"] == usage(21)
    if case == "helper":
        assert got["arguments_done"] == [
            {"name": n, "arguments": a} for n, a in (c[1:] for c in TOOL_CALLS)
        ]


async def test_openai_non_streamed_answer(broker: Broker) -> None:
    """``create({stream: false})``: one ``chat.completion`` with the text, role, ``stop`` and
    usage."""
    got = await broker.run("openai.mjs", "complete", {"maxTokens": 15, "seed": 2})
    assert got["object"] == "chat.completion"
    assert got["role"] == "assistant"
    assert got["content"] == expected_text(15, seed=2)
    assert got["tool_calls"] == []
    assert got["finish_reason"] == "stop"
    assert got["usage"] == usage(15)


async def test_openai_stream_helper_accumulates_the_answer(broker: Broker) -> None:
    """``chat.completions.stream()``: its ``content.delta`` events and
    ``finalChatCompletion()`` both give the exact text, with ``stop`` and usage."""
    got = await broker.run("openai.mjs", "helper", {"maxTokens": 25, "seed": 3})
    assert got["deltas"] == got["content"] == expected_text(25, seed=3)
    assert got["role"] == "assistant"
    assert got["finish_reason"] == "stop"
    assert got["usage"] == usage(25)


async def test_openai_models_list(broker: Broker) -> None:
    """``models.list()`` pages through the routed models, each a complete OpenAI model
    object (``created`` included)."""
    got = await broker.run("openai.mjs", "models")
    models = {m["id"]: m for m in got["models"]}
    assert {"fake", "echo-model", "tool-model"} <= set(models)
    for model in models.values():
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert model["owned_by"] == "streambroker"


async def test_openai_resumes_through_cuts_from_event_ids(broker: Broker) -> None:
    """The SDK's request, cut by the proxy, then resumed again and again at
    ``…/events?format=openai`` from the last chunk's ``event_id``, each response parsed with
    ``Stream.fromSSEResponse``: the text is exact (nothing lost, nothing twice), every resumed
    connection opens with the role chunk stamped with the resume point, and the SDK's
    ``ChatCompletionStream`` accumulates both the whole read and the resumed part alone (which
    it only can with that role chunk)."""
    text = expected_text(CUT_TOKENS, seed=4)
    async with broker.cutting(OPENAI_CUTS, seed=4) as proxy:
        params = {"maxTokens": CUT_TOKENS, "seed": 4, "rate": CUT_RATE}
        got = await broker.run("openai.mjs", "resume", params, proxy)
    assert proxy.cuts > 0
    assert got["connections"] > 2
    assert got["text"] == text
    assert got["finish_reasons"] == ["stop"]
    assert got["usage"] == usage(CUT_TOKENS)
    assert_strictly_increasing(got["event_ids"])
    leads = got["resumed_leads"]
    assert any(lead["delta"] is not None for lead in leads), "no resume got to its first chunk"
    for lead in leads:
        if lead["delta"] is not None:  # (a connection may be cut before its first chunk)
            assert lead["delta"] == {"role": "assistant", "content": ""}
            assert lead["event_id"] == lead["from"]  # the resume point; it has no SSE id
    assert got["accumulated"] == {"role": "assistant", "content": text, "finish_reason": "stop"}
    rest = text[len(got["text_before_resuming"]) :]
    assert got["accumulated_resumed"] == {
        "role": "assistant",
        "content": rest,
        "finish_reason": "stop",
    }


# -- ai + @ai-sdk/openai-compatible ------------------------------------------------------------


@pytest.mark.parametrize("case", ["stream", "generate"])
@pytest.mark.parametrize("model", ["fake", "echo-model"])
async def test_ai_sdk_text_finish_reason_and_usage(broker: Broker, case: str, model: str) -> None:
    """``streamText`` (its deltas and ``text``) and ``generateText``: the exact text,
    ``finishReason`` ``stop``, and the usage in the AI SDK's terms."""
    tokens = 20 if model == "fake" else 7
    got = await broker.run("ai-sdk.mjs", case, {"model": model, "maxTokens": tokens, "seed": 5})
    text = expected_text(tokens, seed=5) if model == "fake" else echo_text(tokens)
    assert got.get("errors", []) == []
    assert got["text"] == text
    if case == "stream":
        assert got["deltas"] == text
    assert got["finish_reason"] == "stop"
    assert got["raw_finish_reason"] == "stop"
    assert got["usage"]["inputTokens"] == PROMPT_TOKENS
    assert got["usage"]["outputTokens"] == tokens
    assert got["usage"]["totalTokens"] == PROMPT_TOKENS + tokens
    assert got["tool_calls"] == []


@pytest.mark.parametrize("case", ["stream", "generate"])
async def test_ai_sdk_tool_calls(broker: Broker, case: str) -> None:
    """Tools declared with zod and with a JSON schema, no ``execute``: the model's calls come
    back parsed and validated, with ``finishReason`` ``tool-calls``."""
    got = await broker.run("ai-sdk.mjs", case, {"model": "tool-model", "tools": True})
    assert got.get("errors", []) == []
    calls = [(c["toolCallId"], c["toolName"], c["input"]) for c in got["tool_calls"]]
    assert calls == TOOL_INPUTS
    assert got["finish_reason"] == "tool-calls"
    assert got["raw_finish_reason"] == "tool_calls"
    assert got["text"] == ""


async def test_ai_sdk_stream_text_reports_a_failed_generation(broker: Broker) -> None:
    """A generation that fails after 3 tokens (the fake's ``fail_after_tokens``): streamText
    delivers those tokens, then an error part carrying the broker's message and code (the
    OpenAI error object in the stream)."""
    got = await broker.run("ai-sdk.mjs", "stream", {"maxTokens": 10, "seed": 13, "failAfter": 3})
    assert got["deltas"] == expected_text(3, seed=13)
    [error] = got["errors"]
    assert error["name"] == "StreamProviderError"
    assert "the fake model failed" in error["message"]
    assert error["data"]["code"] == "fake_failure"
    assert "error" in got["part_types"]


async def test_ai_sdk_generate_text_reports_a_failed_generation(broker: Broker) -> None:
    """generateText (retries off): an ``APICallError`` with the broker's status, message and
    code in OpenAI's error shape."""
    got = await broker.run("ai-sdk.mjs", "generate", {"maxTokens": 10, "seed": 13, "failAfter": 3})
    assert got["error"]["name"] == "APICallError"
    assert "the fake model failed" in got["error"]["message"]
    assert got["error"]["data"]["error"]["code"] == "fake_failure"
    assert got["status"] == 422  # the request asked for the failure: a 4xx, not retried


async def test_ai_sdk_does_not_retry_a_generation_that_cannot_succeed(broker: Broker) -> None:
    """generateText with the SDK's default retries, on a request the upstream rejects (400):
    one generation, one upstream request. The AI SDK ignores ``x-should-retry`` and retries
    every 5xx, so a failure that is the request's fault must be answered with a 4xx."""
    before = await broker.stream_count("error-400")
    upstream_before = broker.upstream.requests["error-400"]
    got = await broker.run("ai-sdk.mjs", "generate", {"model": "error-400", "defaultRetries": True})
    assert "upstream rejected the request" in got["error"]["message"]
    assert await broker.stream_count("error-400") == before + 1
    assert broker.upstream.requests["error-400"] == upstream_before + 1


# -- @langchain/openai -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["stream", "invoke"])
async def test_langchain_text_usage_and_finish_reason(broker: Broker, case: str) -> None:
    """``ChatOpenAI`` with ``configuration.baseURL``: ``.stream()`` chunks (and their merge)
    and ``.invoke()`` give the exact text, ``usage_metadata`` and the ``stop`` finish reason
    in ``response_metadata``."""
    got = await broker.run("langchain.mjs", case, {"maxTokens": 20, "seed": 6})
    text = expected_text(20, seed=6)
    assert got["text"] == text
    if case == "stream":
        assert got["chunks_text"] == text
    assert got["finish_reason"] == "stop"
    metadata = got["usage_metadata"]
    assert (metadata["input_tokens"], metadata["output_tokens"], metadata["total_tokens"]) == (
        PROMPT_TOKENS,
        20,
        PROMPT_TOKENS + 20,
    )
    assert got["tool_calls"] == []


@pytest.mark.parametrize("case", ["stream", "invoke"])
async def test_langchain_bound_tools(broker: Broker, case: str) -> None:
    """``bindTools``: the calls as LangChain ``tool_calls`` (id, name, parsed args), streamed
    as chunks and merged, or invoked whole."""
    got = await broker.run("langchain.mjs", case, {"model": "tool-model", "tools": True})
    assert [(c["id"], c["name"], c["args"]) for c in got["tool_calls"]] == TOOL_INPUTS
    assert got["finish_reason"] == "tool_calls"


# -- eventsource, @microsoft/fetch-event-source ---------------------------------------------------

SSE_LIBRARIES = ["eventsource.mjs", "fetch-event-source.mjs"]


def assert_native_read(got: dict[str, Any], text: str, tokens: int) -> None:
    """``metadata`` first, the exact text, every id once and in order, ``done`` last with its
    usage; only the broker's named events (no ``message``, no unnamed or empty event)."""
    events = got["events"]
    types = [e[0] for e in events]
    assert types[0] == "metadata"
    assert types[-1] == "done"
    assert set(types) <= {"metadata", "token", "progress", "done"}
    assert_strictly_increasing([e[1] for e in events])
    assert "".join(json.loads(e[2])["text"] for e in events if e[0] == "token") == text
    done = json.loads(events[-1][2])
    assert done["finish_reason"] == "stop"
    assert done["usage"] == usage(tokens)
    assert got["empty_messages"] == 0


def assert_openai_read(got: dict[str, Any], script: str, text: str, tokens: int) -> None:
    """Unnamed events carrying chunks, ``[DONE]`` last: each chunk's ``event_id`` is the SSE
    id it came under, ids strictly increase, the text is exact, the finish and usage chunks
    come once. A resumed connection's role chunk has no SSE id and repeats the resume point."""
    events = got["events"]
    assert events[-1][2] == "[DONE]"
    chunks, ids = [], []
    for position, (name, sse_id, data) in enumerate(events[:-1]):
        assert name in ("message", "")  # EventSource's name for unnamed events, and the other's
        chunk = json.loads(data)
        if position > 0 and chunk["choices"] and "role" in chunk["choices"][0]["delta"]:
            # A resumed connection's lead: EventSource's lastEventId is still the resume
            # point; fetch-event-source reports the frame's own id, which it has none of.
            assert sse_id == (chunk["event_id"] if script == "eventsource.mjs" else "")
            continue
        assert chunk["event_id"] == sse_id
        chunks.append(chunk)
        ids.append(sse_id)
    assert_strictly_increasing(ids)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in choices) == text
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["stop"]
    assert [c["usage"] for c in chunks if c.get("usage")] == [usage(tokens)]
    assert got["empty_messages"] == 0


def assert_premature_ids_only_at_the_id_line(got: dict[str, Any]) -> None:
    """fetch-event-source commits an id when it parses the ``id:`` line, not when the event
    is complete (its script sends the last delivered id instead, and records where the
    library's own choice differed). Because the broker puts ``id:`` last in every event, that
    only happens to a connection cut exactly between the ``id:`` line and the blank line."""
    for chosen, tail in got.get("premature_ids", []):
        assert tail.endswith(f"\nid: {chosen}\n"), (chosen, tail)


@pytest.mark.parametrize("script", SSE_LIBRARIES)
async def test_sse_libraries_resume_the_native_format_through_cuts(
    broker: Broker, script: str
) -> None:
    """The broker's own events through a proxy that cuts every connection, the library
    reconnecting by itself with ``Last-Event-ID``: everything exactly once, in order
    (``assert_native_read``); any id fetch-event-source took too early was at a cut right
    after its ``id:`` line."""
    async with broker.cutting(NATIVE_CUTS, seed=8) as proxy:
        params = {"maxTokens": CUT_TOKENS, "seed": 8, "rate": CUT_RATE}
        got = await broker.run(script, "native", params, proxy)
    assert proxy.cuts > 0
    assert got["reconnects"] > 1
    assert_native_read(got, expected_text(CUT_TOKENS, seed=8), CUT_TOKENS)
    assert_premature_ids_only_at_the_id_line(got)


@pytest.mark.parametrize("script", SSE_LIBRARIES)
async def test_sse_libraries_resume_the_openai_format_through_cuts(
    broker: Broker, script: str
) -> None:
    """``format=openai`` (ids ``<n>`` and ``<n>.<k>``, the ``id:`` line last) through the
    cutting proxy, resumed by the library: every chunk exactly once (``assert_openai_read``);
    any id fetch-event-source took too early was at a cut right after its ``id:`` line."""
    async with broker.cutting(OPENAI_CUTS, seed=9) as proxy:
        params = {"maxTokens": CUT_TOKENS, "seed": 9, "rate": CUT_RATE}
        got = await broker.run(script, "openai", params, proxy)
    assert proxy.cuts > 0
    assert got["reconnects"] > 1
    assert_openai_read(got, script, expected_text(CUT_TOKENS, seed=9), CUT_TOKENS)
    assert_premature_ids_only_at_the_id_line(got)


@pytest.mark.parametrize("wire", ["native", "openai"])
@pytest.mark.parametrize("script", SSE_LIBRARIES)
async def test_sse_libraries_see_no_event_for_heartbeats(
    broker: Broker, script: str, wire: str
) -> None:
    """An answer slower than the heartbeat (0.3 s): ``: ping`` lines come between the events
    on the wire (counted there), yet the libraries hand over nothing for them; neither for
    the opening ping nor the ``retry:`` line. fetch-event-source dispatches every block that
    a blank line ends, empty or not, so a ping or ``retry:`` block would reach it."""
    got = await broker.run(script, wire, {"maxTokens": 4, "seed": 12, "rate": 2.5})
    assert got["pings"] >= 2  # the opening one, and heartbeats between tokens
    assert got["reconnects"] == 0
    if wire == "native":
        assert_native_read(got, expected_text(4, seed=12), 4)
    else:
        assert_openai_read(got, script, expected_text(4, seed=12), 4)


# -- ai: the UI message stream (format=ai-sdk) ---------------------------------------------------


def assert_tool_parts(message: dict[str, Any]) -> None:
    assert message["parts"] == [
        {"type": "step-start"},
        *(
            {
                "type": f"tool-{name}",
                "toolCallId": call_id,
                "state": "input-available",
                "input": args,
            }
            for call_id, name, args in TOOL_INPUTS
        ),
    ]
    assert message["metadata"]["finish_reason"] == "tool_calls"


async def test_ui_message_stream_text_on_one_connection(broker: Broker) -> None:
    """``DefaultChatTransport.reconnectToStream`` (every chunk validated against
    ``uiMessageChunkSchema``) into ``readUIMessageStream``: one assistant message with the
    stream's id, one text part with the exact text, the finish metadata, and no part for the
    transient ``data-progress`` chunks."""
    got = await broker.run("ui-message-stream.mjs", "live", {"maxTokens": 30, "seed": 10})
    assert got["protocol"] == "v1"  # the x-vercel-ai-ui-message-stream header
    assert got["errors"] == []
    message = got["message"]
    assert message["id"] == got["stream_id"]
    assert message["role"] == "assistant"
    assert message["parts"] == [
        {"type": "step-start"},
        {"type": "text", "text": expected_text(30, seed=10), "state": "done"},
    ]
    assert message["metadata"]["model"] == "fake"
    assert message["metadata"]["finish_reason"] == "stop"
    assert message["metadata"]["usage"] == usage(30)
    types = got["chunk_types"]
    assert types[:2] == ["start", "start-step"]
    assert types[-2:] == ["finish-step", "finish"]
    assert "data-progress" in types


async def test_ui_message_stream_tool_calls_on_one_connection(broker: Broker) -> None:
    """``tool-model``'s calls as tool parts in state ``input-available`` with their parsed
    inputs."""
    got = await broker.run("ui-message-stream.mjs", "live", {"model": "tool-model"})
    assert got["errors"] == []
    assert_tool_parts(got["message"])


async def test_ui_message_stream_of_a_failed_generation(broker: Broker) -> None:
    """A generation that fails after 3 tokens: the text part holds those tokens (ended), the
    ``error`` chunk carries the broker's message, ``code`` and ``retryable`` and reaches
    ``readUIMessageStream``'s ``onError``; no finish."""
    params = {"maxTokens": 10, "seed": 14, "failAfter": 3}
    got = await broker.run("ui-message-stream.mjs", "live", params)
    assert got["message"]["parts"] == [
        {"type": "step-start"},
        {"type": "text", "text": expected_text(3, seed=14), "state": "done"},
    ]
    [chunk] = got["error_chunks"]
    assert chunk["code"] == "fake_failure"
    assert chunk["retryable"] is False
    assert got["errors"] == [chunk["errorText"]]
    assert "the fake model failed" in chunk["errorText"]
    assert got["chunk_types"][-2:] == ["text-end", "error"]


@pytest.mark.parametrize("model", ["fake", "tool-model"])
async def test_ui_message_stream_resumes_through_cuts(broker: Broker, model: str) -> None:
    """``format=ai-sdk`` through the cutting proxy, every cut resumed with ``Last-Event-ID``,
    all connections feeding ONE ``readUIMessageStream``: the same message and the same chunk
    sequence as a read of the stream on one connection (no chunk lost or repeated, part ids
    and tool state intact), and ids strictly increasing. Resuming from the last id then
    answers 204, which the chat transport's ``reconnectToStream`` turns into null."""
    params = {"model": model, "maxTokens": CUT_TOKENS, "seed": 11, "rate": CUT_RATE}
    async with broker.cutting(AI_SDK_CUTS, seed=11) as proxy:
        got = await broker.run("ui-message-stream.mjs", "resume", params, proxy)
    assert proxy.cuts > 0
    assert got["connections"] > 1
    assert_strictly_increasing(got["ids"])
    assert got["errors"] == got["whole"]["errors"] == []
    assert got["message"] == got["whole"]["message"]
    assert got["chunk_types"] == got["whole"]["chunk_types"]
    assert got["after_end"] is None  # resuming from the last id: 204, reconnectToStream null
    if model == "fake":
        texts = [p["text"] for p in got["message"]["parts"] if p["type"] == "text"]
        assert texts == [expected_text(CUT_TOKENS, seed=11)]
    else:
        assert_tool_parts(got["message"])
