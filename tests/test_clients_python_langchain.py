"""Python client libraries nobody here wrote, unchanged, against a live broker (Redis, an
api process, a worker, and the local OpenAI-compatible upstream for ``echo-model`` and
``tool-model``): ``langchain-openai``'s ``ChatOpenAI``: invoke, stream, bound tools, the async
pair, and the broker's failures raised.

Answers are compared with the exact text of the deterministic ``fake`` model (or the
upstream's scripted tool calls), never with what another client of the same broker received.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from tests.support.client_libraries import FAST, PROMPT_TOKENS, UpstreamBroker, fake
from tests.support.generations import MESSAGES, expected_text
from tests.support.openai_answers import TOOL_CALLS

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


def chat_model(broker: UpstreamBroker, model: str = "fake", **options: Any) -> ChatOpenAI:
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


def test_langchain_invoke_gets_text_usage_and_finish_reason(broker: UpstreamBroker) -> None:
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


def test_langchain_stream_gets_text_in_pieces_and_usage(broker: UpstreamBroker) -> None:
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
def test_langchain_bind_tools_gets_the_upstream_tool_calls(
    broker: UpstreamBroker, how: str
) -> None:
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
async def test_langchain_ainvoke_and_astream(broker: UpstreamBroker) -> None:
    """The async pair, ``.ainvoke`` and ``.astream``: the same exact text and usage."""
    llm = chat_model(broker, max_tokens=14, extra_body=fake(seed=23), stream_usage=True)
    message = await llm.ainvoke(MESSAGES)
    parts = [part async for part in llm.astream(MESSAGES)]
    whole = joined(parts)
    assert message.content == whole.content == expected_text(14, seed=23)
    assert_usage(message, 14)
    assert_usage(whole, 14)
    assert whole.response_metadata["finish_reason"] == "stop"


def test_langchain_raises_the_broker_failure(broker: UpstreamBroker) -> None:
    """A generation that fails after some tokens: ``.invoke`` and ``.stream`` both raise an
    ``openai.APIError`` with the broker's message (not a partial answer)."""
    failing = {"fake": {"fail_after_tokens": 3, "tokens_per_second": FAST}}
    llm = chat_model(broker, max_tokens=10, extra_body=failing)
    with pytest.raises(openai.APIError, match="the fake model failed after 3 tokens"):
        llm.invoke(MESSAGES)
    with pytest.raises(openai.APIError, match="the fake model failed after 3 tokens"):
        list(llm.stream(MESSAGES))
