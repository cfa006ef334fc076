"""``FailoverReader`` (``tests.support.failover_readers``) classifies as it says, against
scripted answers: the failover tests count on its ``silent`` being found when it happens."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import pytest

from tests.support.failover_readers import FailoverReader, ReaderResult, tally

pytestmark = pytest.mark.anyio

BASES = ["http://api-1", "http://api-2"]
Answer = Callable[[httpx.Request], httpx.Response]


def sse(*events: tuple[int, str, dict[str, object]]) -> bytes:
    blocks = [": ping\n\n"]
    for seq, kind, data in events:
        blocks.append(f"id: {seq}\nevent: {kind}\ndata: {json.dumps(data)}\n\n")
    return "".join(blocks).encode()


def token(seq: int, text: str) -> tuple[int, str, dict[str, object]]:
    return seq, "token", {"text": text, "tokens": 1}


DONE = {"finish_reason": "stop"}


async def read(
    answers: list[Answer], expected: str = "Hi there", seconds: float = 2
) -> tuple[ReaderResult, list[httpx.Request]]:
    """One reader against ``answers``, one per connection (the last one repeats)."""
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return answers[min(len(requests), len(answers)) - 1](request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        reader = FailoverReader(client, BASES, "s1", expected, cut_after=(5, 5))
        return await reader.run(time.monotonic() + seconds), requests


def body(*events: tuple[int, str, dict[str, object]], status: int = 200) -> Answer:
    return lambda _: httpx.Response(status, content=sse(*events))


async def test_a_resumed_read_to_done_with_the_exact_text_completes() -> None:
    result, requests = await read(
        [body((1, "metadata", {}), token(2, "Hi")), body(token(3, " there"), (4, "done", DONE))]
    )
    assert (result.outcome, result.reason, result.text) == ("completed", "done", "Hi there")
    assert [r.url.host for r in requests] == ["api-1", "api-2"]
    assert "last-event-id" not in requests[0].headers
    assert requests[1].headers["last-event-id"] == "2"
    assert result.repeated == 0


async def test_done_over_another_text_is_silent() -> None:
    result, _ = await read([body(token(1, "Hi"), (2, "done", DONE))])
    assert (result.outcome, result.reason) == ("silent", "done:text differs")


async def test_an_error_event_or_a_410_is_explicit() -> None:
    error = {"code": "log_lost", "message": "lost", "retryable": True}
    result, _ = await read([body(token(1, "Hi"), (2, "error", error))])
    assert (result.outcome, result.reason) == ("explicit", "error:log_lost")
    result, _ = await read([body(token(1, "Hi")), body(status=410)])
    assert (result.outcome, result.reason) == ("explicit", "http:410")


async def test_a_204_before_the_end_is_silent() -> None:
    result, _ = await read([body(token(1, "Hi there")), body(status=204)])
    assert (result.outcome, result.reason) == ("silent", "204")


async def test_ids_sent_again_are_counted() -> None:
    result, _ = await read(
        [body(token(1, "Hi")), body(token(1, "Hi"), token(2, " there"), (3, "done", DONE))]
    )
    assert result.repeated == 1


async def test_retrying_through_503_until_the_deadline_is_a_silent_timeout() -> None:
    result, _ = await read([body(status=503)], seconds=0.5)
    assert (result.outcome, result.reason) == ("silent", "timeout")
    assert result.statuses[503] >= 2
    assert tally([result]) == {"silent": 1, "silent:timeout": 1}
