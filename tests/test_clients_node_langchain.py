"""Node.js client libraries nobody here wrote, unchanged, against a live broker (Redis, an
api process, a worker, and the local OpenAI-compatible upstream for ``echo-model`` and
``tool-model``). Each case runs a script of ``tests/clients/node`` with the pinned Node 22
and libraries (``package-lock.json``), which prints what the library observed; the
assertions are here.

This module covers ``@langchain/openai``'s ``ChatOpenAI``: ``.stream()`` and ``.invoke()``
(text, usage, finish reason) and ``bindTools``.

Answers are compared with the exact text of the deterministic ``fake`` model (or the
upstream's scripted answers), never with what another client of the same broker received.
"""

from __future__ import annotations

import pytest

from tests.support.client_libraries import PROMPT_TOKENS
from tests.support.generations import expected_text
from tests.support.node import TOOL_INPUTS, NodeBroker

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


@pytest.mark.parametrize("case", ["stream", "invoke"])
async def test_langchain_text_usage_and_finish_reason(node_broker: NodeBroker, case: str) -> None:
    """``ChatOpenAI`` with ``configuration.baseURL``: ``.stream()`` chunks (and their merge)
    and ``.invoke()`` give the exact text, ``usage_metadata`` and the ``stop`` finish reason
    in ``response_metadata``."""
    got = await node_broker.run("langchain.mjs", case, {"maxTokens": 20, "seed": 6})
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
async def test_langchain_bound_tools(node_broker: NodeBroker, case: str) -> None:
    """``bindTools``: the calls as LangChain ``tool_calls`` (id, name, parsed args), streamed
    as chunks and merged, or invoked whole."""
    got = await node_broker.run("langchain.mjs", case, {"model": "tool-model", "tools": True})
    assert [(c["id"], c["name"], c["args"]) for c in got["tool_calls"]] == TOOL_INPUTS
    assert got["finish_reason"] == "tool_calls"
