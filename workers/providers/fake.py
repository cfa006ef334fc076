"""The built-in ``fake`` model: deterministic, rate-controlled, able to fail on request.

Same messages, ``max_tokens`` and seed give the same text, of exactly ``max_tokens`` tokens,
on any machine and Python version (words are picked by BLAKE2b, not by ``random``). It makes
demos, tests and load runs possible with no model and no network.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncGenerator, Iterator

from broker.request import FakeOptions, GenerationRequest
from workers.providers.base import Chunk, Finish, ProviderError, Resume, TextDelta, Usage

VOCABULARY = (  # noqa: SIM905 - a sentence reads better than a 70-item literal
    "the stream of tokens flows from model to reader through a durable log where every "
    "event keeps its place so that clients who drop can resume at their offset and many "
    "viewers watch one answer at once while workers write batches and front ends fan them "
    "out without losing or repeating anything broker redis worker client resume event "
    "token answer light river signal quiet morning garden window paper orbit harbor"
).split()

#: Without a sleep, yield to the event loop this often so a fast fake never starves others.
_YIELD_EVERY = 64


def iter_fake_tokens(
    messages: list[dict[str, object]], max_tokens: int, seed: int, *, start: int = 0
) -> Iterator[str]:
    """The exact tokens the fake model produces for these inputs, made one at a time (a
    large ``max_tokens`` must not block the worker's event loop while a list is built).
    Token ``i`` depends only on the inputs and ``i``: from ``start`` on, they are the ones
    an uninterrupted run makes there (how the fake continues a generation exactly)."""
    key = json.dumps(messages, sort_keys=True, separators=(",", ":")).encode()
    base = hashlib.blake2b(key + seed.to_bytes(16, "big", signed=True), digest_size=16).digest()
    for i in range(start, max_tokens):
        digest = hashlib.blake2b(i.to_bytes(8, "big"), key=base, digest_size=4).digest()
        word = VOCABULARY[int.from_bytes(digest, "big") % len(VOCABULARY)]
        yield word.capitalize() if i == 0 else " " + word


def fake_tokens(messages: list[dict[str, object]], max_tokens: int, seed: int) -> list[str]:
    """All of ``iter_fake_tokens`` at once (what tests compare a stream against)."""
    return list(iter_fake_tokens(messages, max_tokens, seed))


def prompt_tokens(messages: list[dict[str, object]]) -> int:
    """A word count of the prompt: the fake's stand-in for a tokenizer."""
    contents = (m.get("content") for m in messages)
    return sum(len(c.split()) for c in contents if isinstance(c, str))


def _requested_failure(after: int) -> ProviderError:
    return ProviderError(
        "fake_failure",
        f"the fake model failed after {after} tokens, as the request asked",
        retryable=False,
    )


class FakeProvider:
    name = "fake"

    def __init__(self, *, default_max_tokens: int) -> None:
        self.default_max_tokens = default_max_tokens

    async def stream(
        self, request: GenerationRequest, resume: Resume | None = None
    ) -> AsyncGenerator[Chunk, None]:
        """The tokens; with ``resume``, those after the ``resume.tokens`` already written
        (every route continues the fake exactly), at the same pace, failing where an
        uninterrupted run fails. Usage counts the tokens this run made."""
        options = request.fake or FakeOptions()
        max_tokens = request.max_tokens or self.default_max_tokens
        done = min(resume.tokens, max_tokens) if resume is not None else 0
        tokens = iter_fake_tokens(request.messages, max_tokens, options.seed, start=done)
        interval = 1.0 / options.tokens_per_second
        # As if the run had started ``done`` tokens ago: the next token is due now.
        start = time.monotonic() - done * interval
        for i, text in enumerate(tokens, done):
            if i == options.fail_after_tokens:
                raise _requested_failure(i)
            # Pace against the start time, not the previous token, so delays do not drift.
            delay = start + i * interval - time.monotonic()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            elif i % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            yield TextDelta(text)
        if options.fail_after_tokens == max_tokens:
            raise _requested_failure(max_tokens)
        yield Finish("stop")
        prompt = prompt_tokens(request.messages)
        made = max_tokens - done
        yield Usage(prompt_tokens=prompt, completion_tokens=made, total_tokens=prompt + made)

    async def aclose(self) -> None:
        return None
