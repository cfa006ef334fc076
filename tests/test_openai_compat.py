"""The official ``openai`` SDK, unchanged, pointed at the broker with ``base_url``: streaming
and not, sync and async, ``extra_body`` for the fake model's options, tool calls and errors;
with the fake model and with the local OpenAI-compatible test server as the upstream (the
SDK's answer through the broker must equal its answer straight from that server)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.support.generations import MESSAGES, expected_text
from tests.support.openai_server import TOOL_CALLS, OpenAIServer, echo_text
from tests.support.processes import ApiProcess, Launcher, broker_on_upstream
from tests.support.redis_server import RedisServer
from tests.support.sse import decode_sse

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@dataclass
class Broker:
    api: ApiProcess
    upstream: OpenAIServer

    def sdk(self, **options: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.api.url}/v1", api_key="unused", **options)


@pytest.fixture(scope="module")
def broker(redis_server: RedisServer) -> Iterator[Broker]:
    with broker_on_upstream(redis_server.url) as (api, upstream):
        yield Broker(api, upstream)


def fake_options(seed: int, max_tokens: int = 20) -> dict[str, Any]:
    return {"max_tokens": max_tokens, "extra_body": {"fake": {"seed": seed}}}


def test_streaming_answers_openai_chunks_with_the_exact_text(broker: Broker) -> None:
    with broker.sdk() as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model="fake",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            **fake_options(seed=1),
        )
        stream_id = raw.headers["x-stream-id"]
        chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(20, seed=1)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert finishes.count("stop") == 1
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20
    assert {c.id for c in chunks} == {f"chatcmpl-{stream_id}"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.model for c in chunks} == {"fake"}


def test_non_streaming_answers_one_completion_with_usage(broker: Broker) -> None:
    with broker.sdk() as sdk:
        completion = sdk.chat.completions.create(
            model="fake",
            messages=MESSAGES,  # type: ignore[arg-type]
            **fake_options(seed=2, max_tokens=15),
        )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == expected_text(15, seed=2)
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 15


@pytest.mark.anyio
async def test_the_async_sdk_streams_too(broker: Broker) -> None:
    async with openai.AsyncOpenAI(base_url=f"{broker.api.url}/v1", api_key="unused") as sdk:
        stream = await sdk.chat.completions.create(
            model="fake",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            **fake_options(seed=3),
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        whole = await sdk.chat.completions.create(
            model="fake",
            messages=MESSAGES,  # type: ignore[arg-type]
            **fake_options(seed=3),
        )
    assert text == whole.choices[0].message.content == expected_text(20, seed=3)


@pytest.mark.parametrize("model", ["echo-model", "tool-model"])
def test_through_the_broker_the_sdk_gets_what_the_upstream_gives(
    broker: Broker, model: str
) -> None:
    def answer(client: openai.OpenAI) -> tuple[str, dict[int, list[str | None]], str | None]:
        text, calls, finish = "", {}, None
        stream = client.chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            max_tokens=6,
        )
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                for call in choice.delta.tool_calls or []:
                    entry = calls.setdefault(call.index, [None, None, ""])
                    entry[0] = entry[0] or call.id
                    if call.function is not None:
                        entry[1] = entry[1] or call.function.name
                        entry[2] = (entry[2] or "") + (call.function.arguments or "")
                finish = choice.finish_reason or finish
        return text, calls, finish

    with (
        broker.sdk() as through_broker,
        openai.OpenAI(base_url=broker.upstream.base_url, api_key="x") as direct,
    ):
        assert answer(through_broker) == answer(direct)
        non_streamed = through_broker.chat.completions.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=6,
        )
    message = non_streamed.choices[0].message
    if model == "echo-model":
        assert message.content == echo_text(6)
    else:
        calls = [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []]
        assert calls == list(TOOL_CALLS)
        assert non_streamed.choices[0].finish_reason == "tool_calls"


def test_a_stream_resumes_in_openai_format_from_any_event(broker: Broker) -> None:
    with broker.sdk() as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model="fake",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            **fake_options(seed=4, max_tokens=12),
        )
        stream_id = raw.headers["x-stream-id"]
        whole = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    url = f"{broker.api.url}/v1/streams/{stream_id}/events"
    frames = decode_sse(httpx.get(url, params={"format": "openai"}).text)
    assert frames[-1].data == "[DONE]"
    middle = frames[len(frames) // 2].id
    assert middle is not None
    rest = httpx.get(url, params={"format": "openai"}, headers={"Last-Event-ID": middle}).text
    role, *resumed = decode_sse(rest)
    assert resumed == frames[len(frames) // 2 + 1 :]
    assert role.id is None  # the role chunk of a resumed stream leaves the resume point alone
    assert json.loads(role.data)["choices"][0]["delta"]["role"] == "assistant"
    text = ""
    for frame in frames:
        if frame.data != "[DONE]":
            chunk = json.loads(frame.data)
            assert chunk["event_id"] == frame.id
            text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
    assert text == whole == expected_text(12, seed=4)
    bad = httpx.get(url, params={"format": "xml"})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_request"


def test_errors_come_in_openai_shape_and_are_not_retried_when_retrying_cannot_help(
    broker: Broker,
) -> None:
    with broker.sdk(max_retries=2) as sdk:
        with pytest.raises(openai.UnprocessableEntityError) as unknown:
            sdk.chat.completions.create(model="no-such-model", messages=MESSAGES)  # type: ignore[arg-type]
        assert unknown.value.code == "unknown_model"
        assert unknown.value.type == "invalid_request_error"
        with pytest.raises(openai.BadRequestError) as bad:
            sdk.chat.completions.create(model="fake", messages=[{"role": "robot"}])  # type: ignore[list-item]
        assert bad.value.code == "invalid_request"
        assert "messages[0].role" in bad.value.message
        with pytest.raises(openai.BadRequestError, match="only n = 1"):
            sdk.chat.completions.create(model="fake", messages=MESSAGES, n=2)  # type: ignore[arg-type]
        before = len(
            httpx.get(f"{broker.api.url}/v1/streams", params={"limit": 200}).json()["data"]
        )
        failing = {"extra_body": {"fake": {"fail_after_tokens": 2}}}
        with pytest.raises(openai.UnprocessableEntityError) as failed:
            sdk.chat.completions.create(model="fake", messages=MESSAGES, **failing)  # type: ignore[arg-type]
        assert failed.value.code == "fake_failure"
        after = len(httpx.get(f"{broker.api.url}/v1/streams", params={"limit": 200}).json()["data"])
        assert after == before + 1  # x-should-retry: false kept the SDK from trying again
        stream = sdk.chat.completions.create(
            model="fake",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            **failing,  # type: ignore[arg-type]
        )
        with pytest.raises(openai.APIError, match="the fake model failed"):
            list(stream)


def test_models_lists_what_the_broker_routes(broker: Broker) -> None:
    with broker.sdk() as sdk:
        names = {model.id for model in sdk.models.list()}
    assert {"fake", "echo-model", "tool-model"} <= names


def test_with_auth_on_the_sdk_api_key_is_the_broker_key(launch: Launcher) -> None:
    env = {"BROKER_API_KEYS": "sdk-key-0123456789:t1", "BROKER_READ_TOKEN_SECRETS": "k" * 32}
    api = launch.api_and_worker(env, worker_env=env)
    with openai.OpenAI(base_url=f"{api.url}/v1", api_key="wrong") as sdk:
        with pytest.raises(openai.AuthenticationError) as denied:
            sdk.models.list()
        assert denied.value.status_code == 401
        with pytest.raises(openai.AuthenticationError) as denied_create:
            sdk.chat.completions.create(model="fake", messages=MESSAGES)  # type: ignore[arg-type]
        assert denied_create.value.type == "authentication_error"
    with openai.OpenAI(base_url=f"{api.url}/v1", api_key="sdk-key-0123456789") as sdk:
        done = sdk.chat.completions.create(
            model="fake",
            messages=MESSAGES,  # type: ignore[arg-type]
            **fake_options(seed=5, max_tokens=5),
        )
    assert done.choices[0].message.content == expected_text(5, seed=5)
