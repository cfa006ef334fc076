"""Node.js client libraries nobody here wrote, unchanged, against a live broker (Redis, an
api process, a worker, and the local OpenAI-compatible upstream for ``echo-model`` and
``tool-model``). Each case runs a script of ``tests/clients/node`` with the pinned Node 22
and libraries (``package-lock.json``), which prints what the library observed; the
assertions are here.

This module covers ``openai``: streamed and whole answers, usage, finish reasons, tool
calls, the ``chat.completions.stream()`` helper, ``models.list()``, and a read through a
proxy that cuts every connection, resumed from the chunks' ``event_id`` with the SDK's own
SSE parsing.

Answers are compared with the exact text of the deterministic ``fake`` model (or the
upstream's scripted answers), never with what another client of the same broker received.
"""

from __future__ import annotations

import pytest

from tests.support.generations import expected_text
from tests.support.node import CUT_RATE, CUT_TOKENS, OPENAI_CUTS, NodeBroker, usage
from tests.support.openai_answers import TOOL_CALLS, echo_text
from tests.support.resuming import assert_strictly_increasing

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


def tool_calls_as_openai() -> list[dict[str, str]]:
    return [{"id": i, "name": n, "arguments": a} for i, n, a in TOOL_CALLS]


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
    node_broker: NodeBroker, model: str, include_usage: bool, text: str
) -> None:
    """``create({stream: true})``: the role chunk first, the exact text, one ``stop``, the
    usage chunk (``choices: []``) exactly when asked for, one completion id, and each chunk's
    ``event_id`` (its SSE id) strictly increasing."""
    tokens = 20 if model == "fake" else 6
    params = {"model": model, "maxTokens": tokens, "seed": 1, "includeUsage": include_usage}
    got = await node_broker.run("openai.mjs", "stream", params)
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
async def test_openai_gets_the_upstream_tool_calls(node_broker: NodeBroker, case: str) -> None:
    """``tool-model``'s two calls (ids, names, arguments split over many deltas) and the
    ``tool_calls`` finish reason: folded from stream deltas, in ``stream: false``'s message,
    and from the ``chat.completions.stream()`` helper (with its arguments.done events)."""
    got = await node_broker.run("openai.mjs", case, {"model": "tool-model", "tools": True})
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


async def test_openai_non_streamed_answer(node_broker: NodeBroker) -> None:
    """``create({stream: false})``: one ``chat.completion`` with the text, role, ``stop`` and
    usage."""
    got = await node_broker.run("openai.mjs", "complete", {"maxTokens": 15, "seed": 2})
    assert got["object"] == "chat.completion"
    assert got["role"] == "assistant"
    assert got["content"] == expected_text(15, seed=2)
    assert got["tool_calls"] == []
    assert got["finish_reason"] == "stop"
    assert got["usage"] == usage(15)


async def test_openai_stream_helper_accumulates_the_answer(node_broker: NodeBroker) -> None:
    """``chat.completions.stream()``: its ``content.delta`` events and
    ``finalChatCompletion()`` both give the exact text, with ``stop`` and usage."""
    got = await node_broker.run("openai.mjs", "helper", {"maxTokens": 25, "seed": 3})
    assert got["deltas"] == got["content"] == expected_text(25, seed=3)
    assert got["role"] == "assistant"
    assert got["finish_reason"] == "stop"
    assert got["usage"] == usage(25)


async def test_openai_models_list(node_broker: NodeBroker) -> None:
    """``models.list()`` pages through the routed models, each a complete OpenAI model
    object (``created`` included)."""
    got = await node_broker.run("openai.mjs", "models")
    models = {m["id"]: m for m in got["models"]}
    assert {"fake", "echo-model", "tool-model"} <= set(models)
    for model in models.values():
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert model["owned_by"] == "streambroker"


async def test_openai_resumes_through_cuts_from_event_ids(node_broker: NodeBroker) -> None:
    """The SDK's request, cut by the proxy, then resumed again and again at
    ``…/events?format=openai`` from the last chunk's ``event_id``, each response parsed with
    ``Stream.fromSSEResponse``: the text is exact (nothing lost, nothing twice), every resumed
    connection opens with the role chunk stamped with the resume point, and the SDK's
    ``ChatCompletionStream`` accumulates both the whole read and the resumed part alone (which
    it only can with that role chunk)."""
    text = expected_text(CUT_TOKENS, seed=4)
    async with node_broker.cutting(OPENAI_CUTS, seed=4) as proxy:
        params = {"maxTokens": CUT_TOKENS, "seed": 4, "rate": CUT_RATE}
        got = await node_broker.run("openai.mjs", "resume", params, proxy)
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
