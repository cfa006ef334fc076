"""The built-in fake model: exact length, determinism, pacing, and failure on request."""

from __future__ import annotations

import time
from typing import Any

import pytest

from broker.request import FakeOptions, GenerationRequest
from workers.providers.base import Chunk, Finish, ProviderError, TextDelta, Usage
from workers.providers.fake import FakeProvider

pytestmark = pytest.mark.anyio

FAST = 100_000.0
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "Tell me about streams"}]


def request(
    max_tokens: int | None = 40,
    *,
    seed: int = 0,
    rate: float = FAST,
    fail_after: int | None = None,
    messages: list[dict[str, Any]] | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        model="fake",
        messages=MESSAGES if messages is None else messages,
        max_tokens=max_tokens,
        fake=FakeOptions(tokens_per_second=rate, fail_after_tokens=fail_after, seed=seed),
    )


async def run(req: GenerationRequest, default_max_tokens: int = 128) -> list[Chunk]:
    provider = FakeProvider(default_max_tokens=default_max_tokens)
    return [chunk async for chunk in provider.stream(req)]


async def collect(req: GenerationRequest, into: list[Chunk]) -> None:
    """Read the stream into ``into``, so what came before a failure stays visible."""
    async for chunk in FakeProvider(default_max_tokens=128).stream(req):
        into.append(chunk)


def texts(chunks: list[Chunk]) -> list[str]:
    return [c.text for c in chunks if isinstance(c, TextDelta)]


@pytest.mark.parametrize("max_tokens", [1, 2, 17, 300])
async def test_exactly_max_tokens_tokens(max_tokens: int) -> None:
    assert len(texts(await run(request(max_tokens)))) == max_tokens


async def test_the_default_length_applies_without_max_tokens() -> None:
    assert len(texts(await run(request(None), default_max_tokens=23))) == 23
    assert len(texts(await run(request(None), default_max_tokens=5))) == 5


async def test_same_inputs_give_the_same_text() -> None:
    first = texts(await run(request(60, seed=7)))
    second = texts(await run(request(60, seed=7)))
    assert first == second
    assert len(set(first)) > 5  # not one word repeated


async def test_a_different_seed_gives_a_different_text() -> None:
    assert texts(await run(request(60, seed=1))) != texts(await run(request(60, seed=2)))
    assert texts(await run(request(60, seed=0))) != texts(await run(request(60, seed=-1)))


async def test_different_messages_give_a_different_text() -> None:
    other = [{"role": "user", "content": "Tell me about rivers"}]
    assert texts(await run(request(60))) != texts(await run(request(60, messages=other)))
    with_system = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    assert texts(await run(request(60))) != texts(await run(request(60, messages=with_system)))


async def test_the_text_does_not_depend_on_the_rate() -> None:
    assert texts(await run(request(20, rate=FAST))) == texts(await run(request(20, rate=5000)))


async def test_tokens_are_words_the_first_capitalised_without_a_leading_space() -> None:
    tokens = texts(await run(request(50)))
    first, rest = tokens[0], tokens[1:]
    assert not first.startswith(" ")
    assert first[0].isupper()
    assert first[1:] == first[1:].lower()
    assert all(t.startswith(" ") and len(t) > 1 and not t[1:].isspace() for t in rest)
    assert all(t == t.lower() for t in rest)
    assert not "".join(tokens).endswith(" ")


async def test_the_stream_ends_with_finish_then_usage() -> None:
    chunks = await run(request(12))
    assert all(isinstance(c, TextDelta) for c in chunks[:-2])
    assert chunks[-2] == Finish("stop")
    usage = chunks[-1]
    assert isinstance(usage, Usage)
    assert usage.completion_tokens == 12
    assert usage.prompt_tokens == len(MESSAGES[0]["content"].split())
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_usage_counts_the_default_length_too() -> None:
    usage = (await run(request(None), default_max_tokens=9))[-1]
    assert isinstance(usage, Usage)
    assert usage.completion_tokens == 9


async def test_tokens_are_paced_by_the_requested_rate() -> None:
    start = time.monotonic()
    tokens = texts(await run(request(20, rate=200)))
    elapsed = time.monotonic() - start
    assert len(tokens) == 20
    # 19 intervals of 5 ms after the first token: a lower bound only.
    assert elapsed >= 0.09


@pytest.mark.parametrize("fail_after", [1, 3, 39])
async def test_fail_after_tokens_yields_exactly_that_many_then_raises(fail_after: int) -> None:
    got: list[Chunk] = []
    with pytest.raises(ProviderError) as info:
        await collect(request(40, fail_after=fail_after), got)
    assert all(isinstance(c, TextDelta) for c in got)
    assert len(got) == fail_after
    assert texts(got) == texts(await run(request(40)))[:fail_after]
    assert info.value.code == "fake_failure"
    assert info.value.retryable is False
    assert info.value.message


async def test_fail_after_zero_fails_before_any_token() -> None:
    got: list[Chunk] = []
    with pytest.raises(ProviderError) as info:
        await collect(request(10, fail_after=0), got)
    assert got == []
    assert info.value.code == "fake_failure"
    assert info.value.retryable is False


async def test_fail_after_all_tokens_fails_instead_of_finishing() -> None:
    got: list[Chunk] = []
    with pytest.raises(ProviderError, match="10"):
        await collect(request(10, fail_after=10), got)
    assert len(got) == 10
    assert all(isinstance(c, TextDelta) for c in got)


async def test_a_request_without_fake_options_uses_the_defaults() -> None:
    req = GenerationRequest(model="fake", messages=MESSAGES, max_tokens=3)
    chunks = await run(req)
    assert len(texts(chunks)) == 3
    assert texts(chunks) == texts(await run(request(3, seed=FakeOptions().seed)))
