"""Catch-up reads shared by clients asking the same at once (``api.shared_reads``): one read
of the log per distinct page in flight, the same bytes for every caller, no caller able to
cancel the others' read, errors reaching everyone, nothing kept once answered, and the hub's
hand-over read never joining a read issued before its client registered."""

from __future__ import annotations

import asyncio
import re

import anyio
import pytest
import redis.asyncio as aioredis

from api.hub import ReaderHub
from api.shared_reads import SharedReads
from api.sse import encode_event
from api.watch import Reader, watch_frames
from broker.errors import StoreUnavailable
from broker.events import Event, EventType
from broker.generation_log import GenerationLog
from tests.support.generations import claimed
from tests.support.redis_server import RedisServer
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


async def test_a_read_started_before_the_mark_is_not_joined() -> None:
    log = GatedLog(last=3)
    reads = SharedReads(log)  # type: ignore[arg-type]
    early = asyncio.create_task(reads.page(STREAM, 0, 256))
    await eventually_async(lambda: log.reads == 1)
    mark = reads.mark()
    fresh = asyncio.create_task(reads.page(STREAM, 0, 256, after_mark=mark))
    await eventually_async(lambda: log.reads == 2)  # its own read, not the early one
    joined = asyncio.create_task(reads.page(STREAM, 0, 256, after_mark=mark))
    log.gate.set()
    pages = await asyncio.gather(early, fresh, joined)
    assert log.reads == 2
    assert pages[1] is pages[2]  # the read started after the mark is shared


class HeldFirstRead:
    """The real log, whose first read's answer is held until the test lets it go (what a
    busy loop in a reconnect storm does to a reply); later reads answer at once."""

    def __init__(self, log: GenerationLog) -> None:
        self.log = log
        self.reads = 0
        self.release = asyncio.Event()

    async def read(self, stream_id: str, after_seq: int, *, count: int = 512) -> list[Event]:
        self.reads += 1
        first = self.reads == 1
        events = await self.log.read(stream_id, after_seq, count=count)
        if first:
            await self.release.wait()
        return events


@pytest.mark.redis
async def test_the_hand_over_read_never_joins_a_read_issued_before_the_client_registered(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """The hand-over read must reach Redis after the registration: joining another client's
    earlier read of the same page (answered before the hub read on) would leave the events
    in between to the next append, however far away that is."""
    log = GenerationLog(redis, retention_seconds=600)
    stream_id, writer = await claimed(log)
    await writer.append(*[token(s) for s in range(1, 11)])
    held = HeldFirstRead(log)
    reads = SharedReads(held)  # type: ignore[arg-type]
    seen: dict[str, list[int]] = {"live": [], "resumed": []}

    async def watcher(name: str, tail_seq: int | None) -> None:
        frames = watch_frames(log, hub, stream_id, 10, tail_seq=tail_seq, reads=reads)
        async for chunk in frames:
            seen[name] += [int(i) for i in re.findall(rb"id: (\d+)", chunk)]

    hub = ReaderHub(redis_server.url, redis, buffer_frames=256, check_seconds=5)
    async with hub, anyio.create_task_group() as group:
        group.start_soon(watcher, "live", 10)  # at the tail: the hub tails the stream
        await eventually_async(lambda: hub.subscriber_count == 1)
        seen["early"] = []
        group.start_soon(watcher, "early", None)  # its catch-up read of (10, …) is held
        await eventually_async(lambda: held.reads == 1)
        await writer.append(token(11), token(12))
        await eventually_async(lambda: seen["live"] == [11, 12])  # the hub is past 10
        group.start_soon(watcher, "resumed", 10)  # behind the hub: the hand-over read
        await eventually_async(lambda: seen["resumed"] == [11, 12], timeout=5)
        held.release.set()
        group.cancel_scope.cancel()
