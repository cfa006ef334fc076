"""The openai provider continuing an interrupted answer (``Provider.stream(request, resume)``),
through the real SDK against the local OpenAI-compatible server, which continues a partial
answer the way vLLM (``continue_final_message``) and DeepSeek/Mistral (``prefix``) do."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import openai
import pytest

from broker.request import GenerationRequest
from broker.setting_fields import Continuation
from broker.settings import GenerationSettings
from broker.upstream import Upstream
from tests.support.openai_server import (
    PACED_MODEL,
    OpenAIServer,
    continuation_of,
    echo_pieces,
    echo_text,
    prompt_tokens,
)
from workers.providers.base import Chunk, Finish, ProviderError, Resume, TextDelta, Usage
from workers.providers.openai import CONTINUE_INSTRUCTION, OpenAIProvider

pytestmark = pytest.mark.anyio

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say some words please"},
]
WAIT = 10.0
#: The modes the server continues exactly (the others are answered anew).
SERVER_SIDE = [Continuation.CONTINUE_FINAL_MESSAGE, Continuation.PREFIX]
OPENAI_MODES = [*SERVER_SIDE, Continuation.PREFILL, Continuation.PROMPT]

MakeProvider = Callable[[], OpenAIProvider]


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer(pace_ms=5) as running:
        yield running


@pytest.fixture
async def make_provider(server: OpenAIServer) -> AsyncIterator[MakeProvider]:
    server.reset()
    made: list[OpenAIProvider] = []

    def make() -> OpenAIProvider:
        settings = GenerationSettings(upstream_timeout_seconds=WAIT, upstream_max_retries=0)
        made.append(OpenAIProvider(settings, Upstream(base_url=server.base_url)))
        return made[-1]

    yield make
    for provider in made:
        await provider.aclose()


def request(model: str = "echo-model", **fields: Any) -> GenerationRequest:
    return GenerationRequest(model=model, messages=list(MESSAGES), **fields)


async def collect(
    provider: OpenAIProvider, req: GenerationRequest, resume: Resume | None = None
) -> list[Chunk]:
    with anyio.fail_after(WAIT):
        return [chunk async for chunk in provider.stream(req, resume)]


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks if isinstance(c, TextDelta))


def partial_message(text: str, mode: Continuation) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if mode is Continuation.PREFIX:
        message["prefix"] = True
    return message


# -- continuing exactly (vLLM, DeepSeek/Mistral) ---------------------------------------------


@pytest.mark.parametrize("mode", SERVER_SIDE)
async def test_the_continuation_completes_the_uninterrupted_answer(
    make_provider: MakeProvider, server: OpenAIServer, mode: Continuation
) -> None:
    partial = "".join(echo_pieces(3))  # "alpha bravo charlie"
    req = request(max_tokens=7)

    chunks = await collect(make_provider(), req, Resume(partial, 3, mode))

    assert [c.text for c in chunks if isinstance(c, TextDelta)] == echo_pieces(7)[3:]
    assert partial + text_of(chunks) == echo_text(7)
    body = server.last_body
    assert body["messages"] == [*MESSAGES, partial_message(partial, mode)]
    assert body["max_tokens"] == 4
    assert continuation_of(body) == partial
    flags = {"continue_final_message": True, "add_generation_prompt": False}
    if mode is Continuation.CONTINUE_FINAL_MESSAGE:
        assert flags.items() <= body.items()
    else:
        assert flags.keys().isdisjoint(body)
    # The usage is the continuation request's own: its prompt carries the partial answer.
    prompt = prompt_tokens(body["messages"])
    assert prompt == prompt_tokens(MESSAGES) + 3
    assert chunks[-2:] == [Finish("stop"), Usage(prompt, 4, prompt + 4)]
    assert req.messages == MESSAGES
    assert req.max_tokens == 7


@pytest.mark.parametrize("mode", SERVER_SIDE)
async def test_a_worker_killed_mid_answer_is_continued_seamlessly(
    make_provider: MakeProvider, server: OpenAIServer, mode: Continuation
) -> None:
    """The first attempt is cut after three words (its stream closed, as a dying worker's
    connection is); a second provider continues from what was written."""
    req = request(PACED_MODEL, max_tokens=6)
    written: list[str] = []
    with anyio.fail_after(WAIT):
        first = make_provider().stream(req)
        async for chunk in first:
            if isinstance(chunk, TextDelta):
                written.append(chunk.text)
            if len(written) == 3:
                break
        await first.aclose()
        await anyio.to_thread.run_sync(server.disconnected.wait, WAIT)

    resume = Resume("".join(written), len(written), mode)
    chunks = await collect(make_provider(), req, resume)

    assert resume.text + text_of(chunks) == echo_text(6)
    assert server.requests[PACED_MODEL] == 2
    assert server.last_body["max_tokens"] == 3


async def test_without_max_tokens_the_default_answer_is_completed(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    partial = echo_text(5)
    resume = Resume(partial, 5, Continuation.CONTINUE_FINAL_MESSAGE)

    chunks = await collect(make_provider(), request(), resume)

    assert partial + text_of(chunks) == echo_text()
    assert "max_tokens" not in server.last_body
    assert "max_completion_tokens" not in server.last_body


async def test_a_word_cut_in_the_middle_is_finished(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    resume = Resume("alpha bra", 2, Continuation.PREFIX)

    chunks = await collect(make_provider(), request(), resume)

    assert text_of(chunks).startswith("vo charlie")
    assert "alpha bra" + text_of(chunks) == echo_text()


async def test_the_brokers_flags_win_over_the_requests_own_parameters(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    params = {"temperature": 0.5, "top_k": 3, "add_generation_prompt": True}
    params["continue_final_message"] = False
    req = request(max_tokens=4, params=params)
    resume = Resume(echo_text(1), 1, Continuation.CONTINUE_FINAL_MESSAGE)

    chunks = await collect(make_provider(), req, resume)

    assert echo_text(1) + text_of(chunks) == echo_text(4)
    body = server.last_body
    assert body["temperature"] == 0.5
    assert body["top_k"] == 3
    assert body["continue_final_message"] is True
    assert body["add_generation_prompt"] is False
    assert req.params["add_generation_prompt"] is True


async def test_max_completion_tokens_is_reduced_under_its_own_name(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    req = request(max_tokens=6, max_tokens_field="max_completion_tokens")
    resume = Resume(echo_text(2), 2, Continuation.PREFIX)

    chunks = await collect(make_provider(), req, resume)

    assert server.last_body["max_completion_tokens"] == 4
    assert "max_tokens" not in server.last_body
    assert echo_text(2) + text_of(chunks) == echo_text(6)


# -- continuing by prompting (llama.cpp prefill, any server) ---------------------------------


async def test_prefill_sends_the_partial_answer_as_the_last_message(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    partial = echo_text(2)

    chunks = await collect(
        make_provider(), request(max_tokens=5), Resume(partial, 2, Continuation.PREFILL)
    )

    body = server.last_body
    assert body["messages"] == [*MESSAGES, {"role": "assistant", "content": partial}]
    assert body["max_tokens"] == 3
    assert {"continue_final_message", "add_generation_prompt"}.isdisjoint(body)
    # A server that does not prefill answers anew: the seam shows (here, it starts over).
    assert continuation_of(body) is None
    assert text_of(chunks) == echo_text(3)


async def test_prompt_mode_asks_the_model_to_go_on(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    partial = echo_text(2)

    chunks = await collect(
        make_provider(), request(max_tokens=5), Resume(partial, 2, Continuation.PROMPT)
    )

    body = server.last_body
    assert body["messages"] == [
        *MESSAGES,
        {"role": "assistant", "content": partial},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]
    assert body["max_tokens"] == 3
    assert {"continue_final_message", "add_generation_prompt"}.isdisjoint(body)
    assert text_of(chunks) == echo_text(3)  # approximate: the model answers the new turn
    assert "repeat" in CONTINUE_INSTRUCTION
    assert "middle of a word" in CONTINUE_INSTRUCTION


# -- nothing to continue, or nothing left ----------------------------------------------------


@pytest.mark.parametrize("mode", OPENAI_MODES)
@pytest.mark.parametrize("tokens", [5, 6])
async def test_no_tokens_left_finishes_with_length_without_a_request(
    make_provider: MakeProvider, server: OpenAIServer, mode: Continuation, tokens: int
) -> None:
    chunks = await collect(make_provider(), request(max_tokens=5), Resume("x", tokens, mode))

    assert chunks == [Finish("length")]
    assert server.bodies == []


@pytest.mark.parametrize("mode", OPENAI_MODES)
async def test_an_empty_partial_answer_sends_the_original_request(
    make_provider: MakeProvider, server: OpenAIServer, mode: Continuation
) -> None:
    req = request(max_tokens=5, params={"temperature": 0.2})
    provider = make_provider()
    uninterrupted = await collect(provider, req)

    continued = await collect(provider, req, Resume("", 0, mode))

    first, second = server.bodies
    assert first == second
    assert continued == uninterrupted
    assert text_of(continued) == echo_text(5)


@pytest.mark.parametrize("mode", [Continuation.OFF, Continuation.EXACT])
async def test_modes_the_provider_cannot_continue_are_a_programming_error(
    make_provider: MakeProvider, server: OpenAIServer, mode: Continuation
) -> None:
    with pytest.raises(ValueError, match=mode.value):
        await collect(make_provider(), request(), Resume(echo_text(2), 2, mode))
    assert server.bodies == []


# -- the test server's continuation and pacing -----------------------------------------------


async def test_the_server_refuses_continue_final_message_with_a_generation_prompt(
    make_provider: MakeProvider, server: OpenAIServer
) -> None:
    """As vLLM does: so a provider that forgets ``add_generation_prompt: false`` fails."""
    messages = [*MESSAGES, {"role": "assistant", "content": "alpha"}]
    req = GenerationRequest("echo-model", messages, params={"continue_final_message": True})

    with pytest.raises(ProviderError) as caught:
        await collect(make_provider(), req)

    assert caught.value.code == "upstream_bad_request"
    assert "add_generation_prompt" in caught.value.message


async def test_paced_echo_takes_its_pace_from_the_body_or_a_header(
    server: OpenAIServer,
) -> None:
    server.reset()
    sdk = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    messages: Any = MESSAGES

    async def elapsed(**options: Any) -> float:
        start = time.monotonic()
        stream = await sdk.chat.completions.create(
            model=PACED_MODEL, messages=messages, max_tokens=4, stream=True, **options
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == echo_text(4)
        return time.monotonic() - start

    async with sdk:
        with anyio.fail_after(WAIT):
            assert await elapsed(extra_body={"pace_ms": 150}) >= 0.45
            assert await elapsed(extra_headers={"X-Pace-Ms": "150"}) >= 0.45
            assert await elapsed() < 0.45  # the server's own pace: 5 ms
    assert server.requests[PACED_MODEL] == 3
