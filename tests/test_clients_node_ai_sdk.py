"""Node.js client libraries nobody here wrote, unchanged, against a live broker (Redis, an
api process, a worker, and the local OpenAI-compatible upstream for ``echo-model`` and
``tool-model``). Each case runs a script of ``tests/clients/node`` with the pinned Node 22
and libraries (``package-lock.json``), which prints what the library observed; the
assertions are here.

This module covers the AI SDK, ``ai`` with ``@ai-sdk/openai-compatible``
(``streamText``/``generateText``: text, tools, failures, retries) and ``ai``'s UI message
stream readers over ``format=ai-sdk`` (live, failed, and across cuts).

Answers are compared with the exact text of the deterministic ``fake`` model (or the
upstream's scripted answers), never with what another client of the same broker received.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.client_libraries import PROMPT_TOKENS
from tests.support.generations import expected_text
from tests.support.node import AI_SDK_CUTS, CUT_RATE, CUT_TOKENS, TOOL_INPUTS, NodeBroker, usage
from tests.support.openai_answers import echo_text
from tests.support.resuming import assert_strictly_increasing

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


@pytest.mark.parametrize("case", ["stream", "generate"])
@pytest.mark.parametrize("model", ["fake", "echo-model"])
async def test_ai_sdk_text_finish_reason_and_usage(
    node_broker: NodeBroker, case: str, model: str
) -> None:
    """``streamText`` (its deltas and ``text``) and ``generateText``: the exact text,
    ``finishReason`` ``stop``, and the usage in the AI SDK's terms."""
    tokens = 20 if model == "fake" else 7
    got = await node_broker.run(
        "ai-sdk.mjs", case, {"model": model, "maxTokens": tokens, "seed": 5}
    )
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
async def test_ai_sdk_tool_calls(node_broker: NodeBroker, case: str) -> None:
    """Tools declared with zod and with a JSON schema, no ``execute``: the model's calls come
    back parsed and validated, with ``finishReason`` ``tool-calls``."""
    got = await node_broker.run("ai-sdk.mjs", case, {"model": "tool-model", "tools": True})
    assert got.get("errors", []) == []
    calls = [(c["toolCallId"], c["toolName"], c["input"]) for c in got["tool_calls"]]
    assert calls == TOOL_INPUTS
    assert got["finish_reason"] == "tool-calls"
    assert got["raw_finish_reason"] == "tool_calls"
    assert got["text"] == ""


async def test_ai_sdk_stream_text_reports_a_failed_generation(node_broker: NodeBroker) -> None:
    """A generation that fails after 3 tokens (the fake's ``fail_after_tokens``): streamText
    delivers those tokens, then an error part carrying the broker's message and code (the
    OpenAI error object in the stream)."""
    got = await node_broker.run(
        "ai-sdk.mjs", "stream", {"maxTokens": 10, "seed": 13, "failAfter": 3}
    )
    assert got["deltas"] == expected_text(3, seed=13)
    [error] = got["errors"]
    assert error["name"] == "StreamProviderError"
    assert "the fake model failed" in error["message"]
    assert error["data"]["code"] == "fake_failure"
    assert "error" in got["part_types"]


async def test_ai_sdk_generate_text_reports_a_failed_generation(node_broker: NodeBroker) -> None:
    """generateText (retries off): an ``APICallError`` with the broker's status, message and
    code in OpenAI's error shape."""
    got = await node_broker.run(
        "ai-sdk.mjs", "generate", {"maxTokens": 10, "seed": 13, "failAfter": 3}
    )
    assert got["error"]["name"] == "APICallError"
    assert "the fake model failed" in got["error"]["message"]
    assert got["error"]["data"]["error"]["code"] == "fake_failure"
    assert got["status"] == 422  # the request asked for the failure: a 4xx, not retried


async def test_ai_sdk_does_not_retry_a_generation_that_cannot_succeed(
    node_broker: NodeBroker,
) -> None:
    """generateText with the SDK's default retries, on a request the upstream rejects (400):
    one generation, one upstream request. The AI SDK ignores ``x-should-retry`` and retries
    every 5xx, so a failure that is the request's fault must be answered with a 4xx."""
    before = await node_broker.stream_count("error-400")
    upstream_before = node_broker.upstream.requests["error-400"]
    got = await node_broker.run(
        "ai-sdk.mjs", "generate", {"model": "error-400", "defaultRetries": True}
    )
    assert "upstream rejected the request" in got["error"]["message"]
    assert await node_broker.stream_count("error-400") == before + 1
    assert node_broker.upstream.requests["error-400"] == upstream_before + 1


# -- ai: the UI message stream (format=ai-sdk) ----------------------------------------------


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


async def test_ui_message_stream_text_on_one_connection(node_broker: NodeBroker) -> None:
    """``DefaultChatTransport.reconnectToStream`` (every chunk validated against
    ``uiMessageChunkSchema``) into ``readUIMessageStream``: one assistant message with the
    stream's id, one text part with the exact text, the finish metadata, and no part for the
    transient ``data-progress`` chunks."""
    got = await node_broker.run("ui-message-stream.mjs", "live", {"maxTokens": 30, "seed": 10})
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


async def test_ui_message_stream_tool_calls_on_one_connection(node_broker: NodeBroker) -> None:
    """``tool-model``'s calls as tool parts in state ``input-available`` with their parsed
    inputs."""
    got = await node_broker.run("ui-message-stream.mjs", "live", {"model": "tool-model"})
    assert got["errors"] == []
    assert_tool_parts(got["message"])


async def test_ui_message_stream_of_a_failed_generation(node_broker: NodeBroker) -> None:
    """A generation that fails after 3 tokens: the text part holds those tokens (ended), the
    ``error`` chunk carries the broker's message, ``code`` and ``retryable`` and reaches
    ``readUIMessageStream``'s ``onError``; no finish."""
    params = {"maxTokens": 10, "seed": 14, "failAfter": 3}
    got = await node_broker.run("ui-message-stream.mjs", "live", params)
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
async def test_ui_message_stream_resumes_through_cuts(node_broker: NodeBroker, model: str) -> None:
    """``format=ai-sdk`` through the cutting proxy, every cut resumed with ``Last-Event-ID``,
    all connections feeding ONE ``readUIMessageStream``: the same message and the same chunk
    sequence as a read of the stream on one connection (no chunk lost or repeated, part ids
    and tool state intact), and ids strictly increasing. Resuming from the last id then
    answers 204, which the chat transport's ``reconnectToStream`` turns into null."""
    params = {"model": model, "maxTokens": CUT_TOKENS, "seed": 11, "rate": CUT_RATE}
    async with node_broker.cutting(AI_SDK_CUTS, seed=11) as proxy:
        got = await node_broker.run("ui-message-stream.mjs", "resume", params, proxy)
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
