"""The reader hub and the watch logic against a real redis-server: hand-over without gap or
duplicate (also when events are appended at the exact moment a client joins), slow-client
isolation with coalescing, and subscriptions ending when a stream disappears."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import pytest
import redis.asyncio as aioredis

from api.hub import ReaderHub
from api.watch import watch_frames
from broker import keys
from broker.events import Event, EventType
from broker.generation_log import GenerationLog, LogWriter
from tests.support.generations import claimed
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

WAIT = 20.0


@dataclass
class Seen:
    ids: list[int] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    text: str = ""


def parse(chunk: bytes, seen: Seen) -> None:
    for block in chunk.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "id" in lines:
            seen.ids.append(int(lines["id"]))
            seen.types.append(lines["event"])
            if lines["event"] == "token":
                seen.text += json.loads(lines["data"])["text"]


@pytest.fixture
def store(redis: aioredis.Redis) -> aioredis.Redis:
    """conftest's flushed client of the session's redis-server, under this file's name."""
    return redis


@pytest.fixture
async def hub(redis_server: RedisServer, store: aioredis.Redis) -> AsyncIterator[ReaderHub]:
    async with ReaderHub(
        redis_server.url, store, buffer_frames=10_000, check_seconds=0.2
    ) as reader_hub:
        yield reader_hub


async def started(log: GenerationLog) -> tuple[str, LogWriter]:
    return await claimed(log)


def token(i: int) -> Event:
    return Event(EventType.TOKEN, {"text": f" t{i}", "tokens": 1})


DONE = Event(EventType.DONE, {"finish_reason": "stop", "usage": None})


async def consume(
    log: GenerationLog,
    hub: ReaderHub,
    stream_id: str,
    after: int,
    *,
    pause: Callable[[Seen], Awaitable[None]] | None = None,
) -> Seen:
    seen = Seen()
    with anyio.fail_after(WAIT):
        async for chunk in watch_frames(log, hub, stream_id, after):
            parse(chunk, seen)
            if pause is not None:
                await pause(seen)
    return seen


def assert_exactly_after(seen: Seen, after: int, last: int) -> None:
    assert seen.ids == list(range(after + 1, last + 1)), "gap or duplicate"
    assert seen.types[-1] == "done"


async def test_clients_joining_during_appends_get_every_later_event_once(
    store: aioredis.Redis, hub: ReaderHub
) -> None:
    log = GenerationLog(store, retention_seconds=600)
    stream_id, writer = await started(log)
    rng = random.Random(3)
    watchers: list[tuple[int, asyncio.Task[Seen]]] = []
    for i in range(400):
        if rng.random() < 0.15:
            after = rng.randint(0, writer.next_seq - 1)
            # Created now, it first runs inside the append below: its reads and its
            # registration interleave with the append at Redis in whatever order happens.
            watchers.append((after, asyncio.create_task(consume(log, hub, stream_id, after))))
        await writer.append(*[token(i * 10 + k) for k in range(rng.randint(1, 3))])
    await writer.append(DONE)
    last = writer.next_seq - 1
    full_text = (await log.get(stream_id)).text
    for after, task in watchers:
        seen = await task
        assert_exactly_after(seen, after, last)
        events = await log.read(stream_id, after, count=100_000)
        assert seen.text == "".join(e.data["text"] for e in events if e.type is EventType.TOKEN)
    assert len(watchers) > 40
    assert full_text.endswith(seen.text)
    assert hub.subscriber_count == 0


class RacingLog(GenerationLog):
    """A log whose reads let the test append an event right after a read answered, before
    the caller acts on it: the exact moments the hand-over must survive."""

    def __init__(self, store: aioredis.Redis) -> None:
        super().__init__(store, retention_seconds=600)
        self.after_read: Callable[[], Awaitable[None]] | None = None

    async def read(
        self, stream_id: str, after_seq: int, *, count: int = 512, block_ms: int | None = None
    ) -> list[Event]:
        events = await super().read(stream_id, after_seq, count=count, block_ms=block_ms)
        if self.after_read is not None:
            hook, self.after_read = self.after_read, None
            await hook()
        return events


@pytest.mark.parametrize("window", ["before registering", "after registering"])
async def test_an_event_appended_at_the_hand_over_is_delivered_once(
    store: aioredis.Redis, hub: ReaderHub, window: str
) -> None:
    log = RacingLog(store)
    stream_id, writer = await started(log)
    await writer.append(token(0), token(1))

    async def append_one() -> None:
        await writer.append(token(2))

    if window == "before registering":
        # The catch-up read comes back short; the event lands before the client registers.
        log.after_read = append_one
    else:
        # The event is sent to Redis the moment the client has registered, before it acts.
        original_subscribe = hub.subscribe
        racing: list[asyncio.Task[None]] = []

        def subscribe_then_race(stream: str, after_seq: int):  # type: ignore[no-untyped-def]
            subscription = original_subscribe(stream, after_seq)
            racing.append(asyncio.create_task(append_one()))
            return subscription

        hub.subscribe = subscribe_then_race  # type: ignore[method-assign]
    watcher = asyncio.create_task(consume(log, hub, stream_id, 0))
    await eventually_async(lambda: writer.next_seq >= 4)
    await writer.append(token(3), DONE)
    seen = await watcher
    assert_exactly_after(seen, 0, 5)
    assert seen.text == " t0 t1 t2 t3"


async def test_a_client_joining_a_stream_the_hub_tails_past_its_cursor_reads_the_gap(
    store: aioredis.Redis, hub: ReaderHub
) -> None:
    """Another client keeps the stream tailed; while the newcomer catches up, the hub reads
    and offers one more event. The newcomer registers behind the hub, so its hand-over read
    must fetch that event now, not when some later event shows the gap."""
    log = RacingLog(store)
    stream_id, writer = await started(log)
    await writer.append(token(0), token(1))
    early = Seen()

    async def early_reader() -> None:
        async for chunk in watch_frames(log, hub, stream_id, 0):
            parse(chunk, early)

    log.after_read = None
    keeper = asyncio.create_task(early_reader())
    await eventually_async(lambda: hub.subscriber_count == 1 and early.ids[-1:] == [2])

    async def hub_moves_on() -> None:
        await writer.append(token(2))
        await eventually_async(lambda: early.ids[-1:] == [3])  # the hub read and offered it

    log.after_read = hub_moves_on  # right after the newcomer's catch-up read (ids 1, 2)
    late = Seen()

    async def late_reader() -> None:
        async for chunk in watch_frames(log, hub, stream_id, 0):
            parse(chunk, late)

    newcomer = asyncio.create_task(late_reader())
    await eventually_async(lambda: late.ids[-1:] == [3])  # no later event comes to reveal the gap
    await writer.append(DONE)
    await asyncio.gather(keeper, newcomer)
    assert_exactly_after(late, 0, 4)
    assert late.text == " t0 t1 t2"


async def test_a_slow_client_falls_back_to_the_log_and_never_holds_up_a_fast_one(
    redis_server: RedisServer, store: aioredis.Redis
) -> None:
    log = GenerationLog(store, retention_seconds=600)
    stream_id, writer = await started(log)
    resume = asyncio.Event()

    async def slow(seen: Seen) -> None:
        if len(seen.ids) == 1:
            await resume.wait()  # a reader that stops reading for a while

    async with ReaderHub(redis_server.url, store, buffer_frames=4, check_seconds=5) as hub:
        slow_task = asyncio.create_task(consume(log, hub, stream_id, 0, pause=slow))
        fast_task = asyncio.create_task(consume(log, hub, stream_id, 0))
        await eventually_async(lambda: hub.subscriber_count >= 2)
        await writer.append(token(0))
        for i in range(1, 60):
            await writer.append(token(i))
        await writer.append(DONE)
        fast = await fast_task  # finishes while the slow one is still stuck
        assert not slow_task.done()
        resume.set()
        slow_seen = await slow_task
    expected = "".join(f" t{i}" for i in range(60))
    assert_exactly_after(fast, 0, 61)
    assert fast.text == expected
    assert slow_seen.text == expected
    assert slow_seen.ids == sorted(set(slow_seen.ids))
    assert slow_seen.ids[-1] == 61
    assert slow_seen.types.count("done") == 1
    # It overflowed and caught up from the log with consecutive tokens merged.
    assert slow_seen.types.count("token") < fast.types.count("token")


async def test_watchers_of_a_stream_that_disappears_end(
    store: aioredis.Redis, hub: ReaderHub
) -> None:
    log = GenerationLog(store, retention_seconds=600)
    stream_id, writer = await started(log)
    await writer.append(token(0))
    watcher = asyncio.create_task(consume(log, hub, stream_id, 0))
    await eventually_async(lambda: hub.subscriber_count >= 1)
    await store.delete(*keys.generation_keys(stream_id))
    seen = await watcher  # ends (no terminal event) instead of pinging forever
    assert seen.ids == [1]
    assert hub.subscriber_count == 0


async def test_drain_ends_every_live_subscription(store: aioredis.Redis, hub: ReaderHub) -> None:
    log = GenerationLog(store, retention_seconds=600)
    stream_id, writer = await started(log)
    await writer.append(token(0))
    watchers = [asyncio.create_task(consume(log, hub, stream_id, 0)) for _ in range(5)]
    await eventually_async(lambda: hub.subscriber_count >= 5)
    hub.drain()
    for watcher in watchers:
        assert (await watcher).ids == [1]
    assert hub.subscribe(stream_id, 1).closed == "shutdown"


async def test_one_hub_reads_many_streams_through_one_connection(
    store: aioredis.Redis, hub: ReaderHub
) -> None:
    log = GenerationLog(store, retention_seconds=600)
    streams = [await started(log) for _ in range(30)]
    watchers = [
        asyncio.create_task(consume(log, hub, stream_id, 0))
        for stream_id, _ in streams
        for _ in range(3)
    ]
    await eventually_async(lambda: hub.subscriber_count >= len(watchers))
    names = [c["name"] for c in await store.client_list()]
    for i, (_, writer) in enumerate(streams):
        await writer.append(token(i), DONE)
    for watcher in watchers:
        assert (await watcher).types == ["token", "done"]
    assert hub.stream_count == 0
    # 90 watchers, 30 streams: the blocking reads are the hub's one connection.
    assert names.count("streambroker-hub") == 1


async def test_a_gap_in_live_frames_is_filled_from_the_log(store: aioredis.Redis) -> None:
    """A safety net: the hand-over leaves no gap, but if frames ever skip ids the reader
    fills them from the log rather than send a hole."""
    from api.hub import Frame, Subscription, Waker
    from api.sse import encode_event
    from api.watch import Reader

    log = GenerationLog(store, retention_seconds=600)
    stream_id, writer = await started(log)
    stored = await writer.append(token(0), token(1), token(2), DONE)
    reader = Reader(log, stream_id, cursor=1)
    subscription = Subscription(stream_id, limit=10, waker=Waker())
    subscription.offer(Frame(4, encode_event(stored[3]), terminal=True))  # 2 and 3 missing
    seen = Seen()
    async for chunk in reader.follow(subscription):
        parse(chunk, seen)
    assert seen.ids == [2, 3, 4]
    assert seen.text == " t1 t2"
