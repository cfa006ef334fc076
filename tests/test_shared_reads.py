"""Catch-up reads shared by clients asking the same at once (``api.shared_reads``): one read
of the log per distinct page in flight, the same bytes for every caller, no caller able to
cancel the others' read, errors reaching everyone, and nothing kept once answered."""

from __future__ import annotations

import asyncio

import pytest

from api.shared_reads import SharedReads
from api.sse import encode_event
from api.watch import Reader
from broker.errors import StoreUnavailable
from broker.events import Event, EventType
from tests.support.waiting import eventually_async

pytestmark = pytest.mark.anyio

STREAM = "01m8tp6b0g1r7zmy6md3swnt25"


def token(seq: int) -> Event:
    return Event(EventType.TOKEN, {"text": f"t{seq}", "tokens": 1}, t=seq, seq=seq)


class GatedLog:
    """A log of ``last`` token events whose reads wait until the test opens the gate."""

    def __init__(self, last: int) -> None:
        self.last = last
        self.reads = 0
        self.gate = asyncio.Event()
        self.error: Exception | None = None

    async def read(self, stream_id: str, after_seq: int, *, count: int = 512) -> list[Event]:
        self.reads += 1
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return [token(s) for s in range(after_seq + 1, min(self.last, after_seq + count) + 1)]


async def test_clients_asking_the_same_page_at_once_share_one_read() -> None:
    log = GatedLog(last=5)
    reads = SharedReads(log)  # type: ignore[arg-type]
    callers = [asyncio.create_task(reads.page(STREAM, 2, 256)) for _ in range(50)]
    other = asyncio.create_task(reads.page(STREAM, 0, 256))  # another page: its own read
    await eventually_async(lambda: log.reads == 2)
    log.gate.set()
    pages = await asyncio.gather(*callers)
    assert log.reads == 2
    assert all(page is pages[0] for page in pages)
    assert pages[0].data == b"".join(encode_event(token(s)) for s in (3, 4, 5))
    assert (pages[0].sent, pages[0].last_seq, pages[0].ended) == (3, 5, False)
    assert (await other).last_seq == 5
    await reads.page(STREAM, 2, 256)  # answered already: a new read, nothing was kept
    assert log.reads == 3


async def test_the_first_caller_hanging_up_does_not_cancel_the_read_for_the_others() -> None:
    log = GatedLog(last=3)
    reads = SharedReads(log)  # type: ignore[arg-type]
    first = asyncio.create_task(reads.page(STREAM, 0, 256))
    await eventually_async(lambda: log.reads == 1)
    second = asyncio.create_task(reads.page(STREAM, 0, 256))
    first.cancel()
    log.gate.set()
    assert (await second).last_seq == 3
    assert first.cancelled()


async def test_a_failed_read_fails_every_caller_and_the_next_one_reads_again() -> None:
    log = GatedLog(last=3)
    log.error = StoreUnavailable("Redis is unreachable")
    reads = SharedReads(log)  # type: ignore[arg-type]
    callers = [asyncio.create_task(reads.page(STREAM, 0, 256)) for _ in range(3)]
    await eventually_async(lambda: log.reads == 1)
    log.gate.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    log.error = None
    assert (await reads.page(STREAM, 0, 256)).last_seq == 3
    assert log.reads == 2


async def test_a_page_stops_at_the_terminal_event() -> None:
    done = Event(EventType.DONE, {"finish_reason": "stop"}, t=3, seq=3)

    class Ended(GatedLog):
        async def read(self, stream_id: str, after_seq: int, *, count: int = 512) -> list[Event]:
            return [token(1), token(2), done]

    reads = SharedReads(Ended(last=3))  # type: ignore[arg-type]
    page = await reads.page(STREAM, 0, 256)
    assert (page.sent, page.last_seq, page.ended) == (3, 3, True)
    assert page.data.endswith(encode_event(done))


async def test_a_reader_catching_up_through_shared_pages_sends_what_the_log_has() -> None:
    log = GatedLog(last=600)  # more than one page
    log.gate.set()
    shared = Reader(log, STREAM, 10, reads=SharedReads(log))  # type: ignore[arg-type]
    alone = Reader(log, STREAM, 10)  # type: ignore[arg-type]
    assert b"".join([c async for c in shared.catch_up()]) == b"".join(
        [c async for c in alone.catch_up()]
    )
    assert shared.cursor == alone.cursor == 600
    assert shared.delivery.events == alone.delivery.events == 590
