"""The openai provider against a local OpenAI-compatible server, through the real SDK."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx2
import openai
import pytest

from broker.request import GenerationRequest
from broker.settings import GenerationSettings
from broker.upstream import PLACEHOLDER_API_KEY, Upstream
from tests.support.openai_server import (
    CUT_AFTER_WORDS,
    RETRY_AFTER_SECONDS,
    TOOL_CALLS,
    OpenAIServer,
    echo_pieces,
    echo_text,
    prompt_tokens,
)
from tests.support.redis_server import free_port
from workers.providers.base import Chunk, Finish, ProviderError, TextDelta, ToolCallDelta, Usage
from workers.providers.openai import (
    OpenAIProvider,
    parse_retry_after,
    to_provider_error,
)

pytestmark = pytest.mark.anyio

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say some words please"},
]
SECRET_KEY = "sk-test-secret-0123456789"
WAIT = 10.0  # bound of every wait; the tests take well under a second each

MakeProvider = Callable[..., OpenAIProvider]


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer(slow_seconds=30.0) as running:
        yield running


@pytest.fixture
async def make_provider(server: OpenAIServer) -> AsyncIterator[MakeProvider]:
    """Providers pointed at the test server; closed after the test."""
    server.reset()
    made: list[OpenAIProvider] = []

    def make(upstream: Upstream | None = None, **settings: Any) -> OpenAIProvider:
        options = {"upstream_timeout_seconds": WAIT, "upstream_max_retries": 0, **settings}
        if upstream is None:
            upstream = Upstream(base_url=server.base_url)
        provider = OpenAIProvider(GenerationSettings(**options), upstream)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


def request(model: str = "echo-model", **fields: Any) -> GenerationRequest:
    return GenerationRequest(model=model, messages=MESSAGES, **fields)


async def collect(
    provider: OpenAIProvider, req: GenerationRequest, into: list[Chunk] | None = None
) -> list[Chunk]:
    chunks = [] if into is None else into
    with anyio.fail_after(WAIT):
        async for chunk in provider.stream(req):
            chunks.append(chunk)
    return chunks


async def failure(
    provider: OpenAIProvider, req: GenerationRequest
) -> tuple[ProviderError, list[Chunk]]:
    chunks: list[Chunk] = []
    with pytest.raises(ProviderError) as caught:
        await collect(provider, req, chunks)
    return caught.value, chunks


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks if isinstance(c, TextDelta))


# -- streaming ------------------------------------------------------------------------------


async def test_streams_text_then_finish_then_usage(make_provider: MakeProvider) -> None:
    chunks = await collect(make_provider(), request(max_tokens=5))

    assert [c.text for c in chunks if isinstance(c, TextDelta)] == echo_pieces(5)
    assert text_of(chunks) == echo_text(5) == "alpha bravo charlie delta echo"
    prompt = prompt_tokens(MESSAGES)
    assert chunks[-2:] == [Finish("stop"), Usage(prompt, 5, prompt + 5)]


async def test_without_max_tokens_the_server_default_applies(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    chunks = await collect(make_provider(), request())

    assert text_of(chunks) == echo_text()
    assert "max_tokens" not in server.last_body


async def test_tool_call_deltas_reassemble_to_the_scripted_calls(
    make_provider: MakeProvider,
) -> None:
    chunks = await collect(make_provider(), request("tool-model"))

    deltas = [c for c in chunks if isinstance(c, ToolCallDelta)]
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
        call["id"] = call["id"] or delta.id
        call["name"] = call["name"] or delta.name
        call["arguments"] += delta.arguments
    assert [(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())] == [*TOOL_CALLS]
    assert all(json.loads(c["arguments"]) for c in calls.values())
    assert len(deltas) > 2 * len(TOOL_CALLS)  # the arguments really came in pieces
    assert Finish("tool_calls") in chunks
    assert text_of(chunks) == ""


async def test_pass_through_parameters_reach_the_upstream(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    params = {
        "temperature": 0.25,
        "seed": 42,
        "stop": ["\n\n", "END"],
        "tools": tools,
        "tool_choice": "auto",
        "top_p": 0.5,
        "some_future_param": {"nested": [1, "two"]},
        "timeout": 12,
    }
    await collect(
        make_provider(), request(max_tokens=3, params=params, metadata={"session": "abc"})
    )

    body = server.last_body
    assert {k: body[k] for k in params} == params
    assert body["max_tokens"] == 3
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == MESSAGES
    assert "metadata" not in body  # the broker's own metadata is not the upstream's


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "code", "retryable"),
    [
        ("error-400", "upstream_bad_request", False),
        ("error-401", "upstream_auth", False),
        ("error-403", "upstream_forbidden", False),
        ("error-404", "upstream_not_found", False),
        ("error-409", "upstream_error", True),
        ("error-422", "upstream_bad_request", False),
        ("error-429", "upstream_rate_limited", True),
        ("error-500", "upstream_unavailable", True),
        ("error-503", "upstream_unavailable", True),
        ("no-such-model", "upstream_not_found", False),
    ],
)
async def test_http_errors_map_to_stable_codes(
    make_provider: MakeProvider, server: OpenAIServer, model: str, code: str, retryable: bool
) -> None:
    upstream = Upstream(base_url=server.base_url, api_key=SECRET_KEY)
    error, chunks = await failure(make_provider(upstream), request(model))

    assert (error.code, error.retryable) == (code, retryable)
    status = model.removeprefix("error-") if model.startswith("error-") else "404"
    assert f"HTTP {status}" in error.message
    assert error.message.endswith(".")
    assert "Traceback" not in error.message
    assert "{" not in error.message  # the upstream's explanation, not its JSON
    assert SECRET_KEY not in error.message
    assert SECRET_KEY not in str(error)
    assert chunks == []
    assert server.requests[model] == 1  # max_retries=0: no retry


async def test_rate_limit_carries_retry_after(make_provider: MakeProvider) -> None:
    error, _ = await failure(make_provider(), request("error-429"))

    assert error.retry_after == RETRY_AFTER_SECONDS
    assert "Rate limit reached" in error.message


async def test_the_api_key_the_upstream_echoes_is_not_repeated(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    upstream = Upstream(base_url=server.base_url, api_key=SECRET_KEY)
    error, _ = await failure(make_provider(upstream), request("error-401"))

    assert server.authorizations == [f"Bearer {SECRET_KEY}"]
    assert "Incorrect API key provided" in error.message
    assert SECRET_KEY not in error.message


async def test_sdk_retries_server_errors_a_bounded_number_of_times(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    error, _ = await failure(make_provider(upstream_max_retries=2), request("error-500"))

    assert error.code == "upstream_unavailable"
    assert server.requests["error-500"] == 3  # the first attempt and two retries


async def test_sdk_does_not_retry_client_errors(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    await failure(make_provider(upstream_max_retries=2), request("error-401"))

    assert server.requests["error-401"] == 1


async def test_a_retried_request_that_recovers_streams_normally(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    chunks = await collect(make_provider(upstream_max_retries=1), request("flaky-503"))

    assert text_of(chunks) == echo_text()
    assert server.requests["flaky-503"] == 2


async def test_a_connection_cut_mid_stream_keeps_the_text_before_it(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    error, chunks = await failure(make_provider(upstream_max_retries=2), request("cut-mid-stream"))

    assert text_of(chunks) == echo_text(CUT_AFTER_WORDS)
    assert (error.code, error.retryable) == ("upstream_connection", True)
    assert server.requests["cut-mid-stream"] == 1  # never retried once the stream started


async def test_a_malformed_chunk_is_not_retryable(make_provider: MakeProvider) -> None:
    error, chunks = await failure(make_provider(), request("malformed-chunk"))

    assert text_of(chunks) == echo_text(2)
    assert (error.code, error.retryable) == ("upstream_malformed", False)


async def test_an_error_inside_the_stream(make_provider: MakeProvider) -> None:
    error, chunks = await failure(make_provider(), request("stream-error"))

    assert text_of(chunks) == echo_text(2)
    assert (error.code, error.retryable) == ("upstream_error", True)  # a server_error
    assert "The model crashed while generating." in error.message


async def test_a_stream_without_finish_reason_is_an_error(make_provider: MakeProvider) -> None:
    error, chunks = await failure(make_provider(), request("no-finish"))

    assert text_of(chunks) == echo_text(2)
    assert error.code == "upstream_malformed"


async def test_a_slow_upstream_times_out(make_provider: MakeProvider) -> None:
    provider = make_provider(upstream_timeout_seconds=0.2)
    with anyio.fail_after(WAIT):
        error, chunks = await failure(provider, request("slow"))

    assert (error.code, error.retryable) == ("upstream_timeout", True)
    assert "0.2 seconds" in error.message
    assert chunks == []


async def test_a_refused_connection(make_provider: MakeProvider) -> None:
    provider = make_provider(Upstream(base_url=f"http://127.0.0.1:{free_port()}/v1"))
    error, _ = await failure(provider, request())

    assert (error.code, error.retryable) == ("upstream_connection", True)


def test_raw_transport_errors_map_like_the_sdk_ones() -> None:
    # The SDK wraps transport errors of its own iterator, but raw httpx2 errors can escape
    # other paths (closing, draining): both must give the same codes.
    req = httpx2.Request("POST", "http://upstream/v1/chat/completions")
    cases = {
        openai.APIConnectionError(request=req): "upstream_connection",
        httpx2.RemoteProtocolError("peer closed connection"): "upstream_connection",
        httpx2.ReadError("reset by peer"): "upstream_connection",
        ConnectionResetError(): "upstream_connection",
        openai.APITimeoutError(request=req): "upstream_timeout",
        httpx2.ReadTimeout("read timed out"): "upstream_timeout",
    }
    for exc, code in cases.items():
        error = to_provider_error(exc, timeout=1)
        assert (error.code, error.retryable) == (code, True), exc


def test_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "1.5", "retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


# -- configuration and closing --------------------------------------------------------------


async def test_a_base_url_without_key_sends_a_placeholder_key(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    await collect(make_provider(Upstream(base_url=server.base_url)), request())

    assert server.authorizations == [f"Bearer {PLACEHOLDER_API_KEY}"]


async def test_no_upstream_configured(make_provider: MakeProvider) -> None:
    error, _ = await failure(make_provider(Upstream()), request())

    assert (error.code, error.retryable) == ("upstream_not_configured", False)


async def test_closing_the_stream_closes_the_upstream_connection(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    stream = make_provider().stream(request("endless"))
    with anyio.fail_after(WAIT):
        received = [await anext(stream) for _ in range(3)]
    assert text_of(received) == echo_text(3)
    assert not server.disconnected.is_set()

    await stream.aclose()

    assert await anyio.to_thread.run_sync(server.disconnected.wait, WAIT)


async def test_cancelling_the_reader_closes_the_upstream_connection(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    provider = make_provider()
    started = anyio.Event()

    async def read() -> None:
        async for _ in provider.stream(request("endless")):
            started.set()

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await started.wait()
            tg.cancel_scope.cancel()

    assert await anyio.to_thread.run_sync(server.disconnected.wait, WAIT)


async def test_aclose_closes_the_client(make_provider: MakeProvider) -> None:
    provider = make_provider()
    await collect(provider, request())
    await provider.aclose()

    with pytest.raises(RuntimeError, match="client has been closed"):
        await collect(provider, request())
