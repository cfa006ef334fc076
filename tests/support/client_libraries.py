"""What the tests of Python client libraries nobody here wrote share (the ``openai`` SDK's
extras, LangChain, litellm, the SSE libraries): the broker they run against, the prompt and
the fake model's options, the tools ``tool-model`` calls, and a chunk's ``event_id``.

The ``broker`` fixture (``tests/conftest.py``) is an ``UpstreamBroker`` that the
``test_clients_python_*`` modules share: an api process and a worker whose upstream is the
local ``OpenAIServer`` (``echo-model``, ``tool-model``…), with a 0.3 s heartbeat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam
from pydantic import BaseModel

from tests.support.generations import MESSAGES, create_stream, stream_state
from tests.support.openai_answers import TOOL_CALLS
from tests.support.openai_server import OpenAIServer
from tests.support.processes import ApiProcess

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
class UpstreamBroker:
    """The api (and its upstream) a module's client-library tests talk to."""

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


def fake(seed: int, rate: float = FAST) -> dict[str, Any]:
    """The fake model's options, as ``extra_body``."""
    return {"fake": {"seed": seed, "tokens_per_second": rate}}


def event_id(chunk: BaseModel) -> str:
    """The broker's ``event_id`` of a chunk (an extra field: the SDKs keep unknown fields)."""
    value = (chunk.model_extra or {}).get("event_id")
    assert isinstance(value, str), f"a chunk without an event_id: {chunk!r}"
    return value
