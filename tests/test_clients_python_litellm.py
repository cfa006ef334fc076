"""Python client libraries nobody here wrote, unchanged, against a live broker (Redis, an
api process, a worker, and the local OpenAI-compatible upstream for ``echo-model`` and
``tool-model``): ``litellm``'s ``openai/`` provider: completion and acompletion, streamed or
not, tool calls, ``stream_chunk_builder``, and the broker's failures raised.

Answers are compared with the exact text of the deterministic ``fake`` model (or the
upstream's scripted tool calls), never with what another client of the same broker received.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

# litellm must read its model price map from its own package, not fetch it: nothing here may
# leave the machine. It reads this variable when it is imported.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm
import openai
import pytest

from tests.support.client_libraries import (
    FAST,
    PROMPT_TOKENS,
    TOOLS,
    UpstreamBroker,
    event_id,
    fake,
)
from tests.support.generations import MESSAGES, expected_text
from tests.support.openai_answers import TOOL_CALLS
from tests.support.resuming import assert_strictly_increasing

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

# litellm prints a "Provider List" banner when it looks up the provider of a model name it
# does not know (the upstream's "fake"); the lookup's failure is handled, the banner is noise.
litellm.suppress_debug_info = True


@pytest.fixture(autouse=True, scope="module")
def no_implicit_event_loop() -> None:
    """litellm's service logger calls ``asyncio.get_event_loop()`` from sync code: in a thread
    that never had a loop set, that makes one which nothing closes (its ResourceWarning is an
    error here). With none set explicitly, litellm runs its hooks with ``asyncio.run``, as it
    does once any async test has run in this thread (it always had in the suite's run)."""
    asyncio.set_event_loop(None)


#: Warnings litellm's own code raises (the suite turns warnings into errors): pydantic's on
#: litellm's ``ReadOnly`` TypedDicts, imported on the first call, and on litellm's streaming
#: reading ``model_fields`` from an instance.
litellm_warnings = pytest.mark.filterwarnings(
    "ignore:Item.* on TypedDict class .* using the `ReadOnly` qualifier:UserWarning",
    "ignore:Accessing the 'model_(computed_)?fields' attribute on the instance:DeprecationWarning",
)


def litellm_options(broker: UpstreamBroker) -> dict[str, Any]:
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
def test_litellm_completion_gets_text_finish_reason_and_usage(
    broker: UpstreamBroker, stream: bool
) -> None:
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
def test_litellm_gets_the_upstream_tool_calls(broker: UpstreamBroker, stream: bool) -> None:
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
async def test_litellm_acompletion_streams(broker: UpstreamBroker) -> None:
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
def test_litellm_raises_the_broker_failure(broker: UpstreamBroker, stream: bool) -> None:
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
