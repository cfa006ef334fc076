"""Live writes (``api.live_writes``): while a client waits at the live tail, the hub writes
new events straight to its connection, and hands the client's task whatever a write cannot
decide (a gap, a connection that pushes back, an end that must wait for the response's own
hook), without ever letting the two paths write out of order.

These drive a real ``Subscription`` and ``Reader`` against a sink that records its writes;
``test_live_writes_e2e`` proves the same through real processes and sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from api.live_writes import DirectWrites, LiveWriter, TransportSink, chunked
from api.sse import PING, encode_event
from api.subscription import Batch, Frame, Subscription, Waker
from api.watch import Reader
from broker.events import Event, EventType
from tests.support.waiting import eventually_async

pytestmark = pytest.mark.anyio

STREAM = "01m8tp6b0g1r7zmy6md3swnt25"


class Sink:
    """A connection that records what is written, and pushes back when told to."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.pushing_back = False
        #: Closed under the check: the write itself fails.
        self.broken = False

    def writable(self) -> bool:
        return not self.pushing_back

    def write(self, chunk: bytes) -> bool:
        if self.broken:
            return False
        self.written.append(chunk)
        return True


def frame(seq: int, *, terminal: bool = False) -> Frame:
    kind = EventType.DONE if terminal else EventType.TOKEN
    data = {"finish_reason": "stop"} if terminal else {"text": f"t{seq}", "tokens": 1}
    return Frame(seq, encode_event(Event(kind, data, t=seq, seq=seq)), terminal)


def batch(*seqs: int, terminal: bool = False) -> Batch:
    return Batch([frame(s, terminal=terminal and s == seqs[-1]) for s in seqs])


class Client:
    """One watcher's reader and subscription, its task parked in ``take`` with a live writer
    armed, as ``api.watch`` leaves them between events."""

    def __init__(self, *, cursor: int = 0, hold_end: bool = False, lead: bytes = b"") -> None:
        self.sink = Sink()
        self.direct = DirectWrites(ping=PING, hold_end=hold_end, lead=lead)
        self.direct.sink = self.sink  # type: ignore[assignment]
        self.reader = Reader(None, STREAM, cursor)  # type: ignore[arg-type]
        self.waker = Waker()
        self.subscription = Subscription(STREAM, 4, self.waker)
        self.live = LiveWriter(self.direct, self.reader)
        self.taken: asyncio.Task[list[Frame]] | None = None

    async def park(self) -> None:
        self.taken = asyncio.create_task(self.subscription.take(self.live))
        await eventually_async(lambda: self.subscription._waiter is not None or self.taken.done())

    @property
    def body(self) -> bytes:
        """What reached the connection, unframed."""
        return b"".join(_unchunk(chunk) for chunk in self.sink.written)


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    watcher = Client(lead=b"retry: 50\n")
    await watcher.park()
    yield watcher
    if watcher.taken is not None:
        watcher.taken.cancel()


def _unchunk(chunk: bytes) -> bytes:
    size, _, rest = chunk.partition(b"\r\n")
    assert rest.endswith(b"\r\n"), chunk
    assert len(rest) == int(size, 16) + 2, chunk
    return rest[:-2]


async def test_events_go_out_as_one_chunk_per_batch_the_first_led_by_the_retry_line(
    client: Client,
) -> None:
    assert client.subscription.offer_batch(batch(1, 2)) == 2
    assert client.subscription.offer_batch(batch(3)) == 1
    assert client.sink.written == [
        chunked(b"retry: 50\n" + frame(1).data + frame(2).data),
        batch(3).chunk,  # the very bytes every other client of the stream gets
    ]
    assert (client.reader.cursor, client.reader.delivery.events) == (3, 3)
    assert client.reader.delivery.last_id == 3
    assert client.reader.delivery.live_bytes == len(client.body)  # for the access log
    assert client.taken is not None
    assert not client.taken.done()  # the task slept through
    assert len(client.waker) == 0


async def test_what_the_client_had_from_the_log_is_not_written_again() -> None:
    watcher = Client(cursor=3)
    await watcher.park()
    assert watcher.subscription.offer_batch(batch(1, 2, 3)) == 0
    assert watcher.subscription.offer_batch(batch(2, 3, 4, 5)) == 2
    assert watcher.body == frame(4).data + frame(5).data
    assert watcher.reader.cursor == 5


async def test_a_gap_wakes_the_task_which_gets_the_frame_to_fill_it_from_the_log(
    client: Client,
) -> None:
    client.subscription.offer_batch(batch(1))
    assert client.subscription.offer_batch(batch(3)) == 0  # 2 never reached the hub
    assert client.subscription.live is None
    assert client.body == b"retry: 50\n" + frame(1).data
    # The task takes frame 3 (``Reader.follow`` then reads 2 from the log).
    client.waker._queue.popleft().wake()
    assert client.taken is not None
    assert [f.seq for f in await client.taken] == [3]


async def test_after_a_push_back_every_later_event_waits_for_the_task_in_order(
    client: Client,
) -> None:
    client.subscription.offer_batch(batch(1))
    client.sink.pushing_back = True
    assert client.subscription.offer_batch(batch(2)) == 0
    client.sink.pushing_back = False  # drained: still not the hub's to write
    assert client.subscription.offer_batch(batch(3)) == 0
    client.waker._queue.popleft().wake()
    assert client.taken is not None
    assert [f.seq for f in await client.taken] == [2, 3]
    assert client.body == b"retry: 50\n" + frame(1).data
    assert client.reader.cursor == 1  # the task sends 2 and 3 itself, then moves it


async def test_a_write_the_connection_refuses_leaves_the_batch_and_the_retry_line_to_the_task(
    client: Client,
) -> None:
    client.sink.broken = True
    assert client.subscription.offer_batch(batch(1)) == 0
    assert client.subscription.live is None
    assert client.direct.lead == b"retry: 50\n"  # still to lead the first event
    assert client.reader.cursor == 0
    client.subscription.poke()  # a heartbeat it cannot write goes to the task as well
    client.waker._queue.popleft().wake()
    assert client.taken is not None
    assert [f.seq for f in await client.taken] == [1]


async def test_the_end_is_written_then_the_task_wakes_to_finish(client: Client) -> None:
    assert client.subscription.offer_batch(batch(1, 2, terminal=True)) == 2
    assert client.reader.ended
    assert client.reader.delivery.ended
    client.waker._queue.popleft().wake()
    assert client.taken is not None
    assert await client.taken == []  # nothing left to send: the response ends


async def test_an_end_that_must_wait_for_the_response_is_left_to_the_task() -> None:
    watcher = Client(hold_end=True)  # a counted connection slot goes back before the end
    await watcher.park()
    assert watcher.subscription.offer_batch(batch(1, 2, terminal=True)) == 0
    assert not watcher.reader.ended
    watcher.waker._queue.popleft().wake()
    assert watcher.taken is not None
    assert [f.seq for f in await watcher.taken] == [1, 2]


async def test_a_heartbeat_is_written_without_waking_the_task(client: Client) -> None:
    client.subscription.poke()
    assert client.sink.written == [chunked(PING)]
    assert client.reader.delivery.live_bytes == len(PING)
    assert len(client.waker) == 0
    client.sink.pushing_back = True
    client.subscription.poke()  # left to the task, which writes it once it can
    assert len(client.waker) == 1


async def test_nothing_is_written_before_the_response_opened_the_connection() -> None:
    watcher = Client()
    watcher.direct.sink = None
    await watcher.park()
    assert watcher.subscription.live is None  # not armed: nothing to write to yet
    watcher.subscription.offer_batch(batch(1))
    assert watcher.sink.written == []
    assert watcher.taken is not None
    watcher.taken.cancel()


async def test_a_waking_task_disarms_the_writer(client: Client) -> None:
    client.subscription.close("shutdown")
    assert client.taken is not None
    assert await client.taken == []
    assert client.subscription.live is None
    assert client.subscription.offer_batch(batch(1)) == 0
    assert client.sink.written == []


def test_a_batch_with_a_hole_in_it_is_never_written_by_the_hub() -> None:
    holed = Batch([frame(1), frame(3)])
    assert not holed.contiguous
    watcher = Client()
    watcher.subscription.live = watcher.live
    assert watcher.subscription.offer_batch(holed) == 0
    assert watcher.sink.written == []


async def test_only_uvicorns_own_send_leads_to_a_connection() -> None:
    async def send(message: object) -> None:
        pass

    assert TransportSink.of(None) is None
    assert TransportSink.of(send) is None  # a middleware's wrapper, a test transport…
