"""One reader per api process: it tails every stream local clients watch and fans out.

However many clients are connected, the process reads Redis through one dedicated
connection: a single blocking ``XREAD`` over every watched stream's log (plus this hub's
own *wake* stream, so that a newly watched stream joins the read at once instead of when the
block times out). Each event read is encoded to SSE bytes once, and the same bytes are
offered to every subscriber of that stream.

The hub never waits for a subscriber: ``Subscription.offer`` appends to a bounded buffer or,
when the buffer is full, marks the subscription *overflowed* and drops it from live delivery.
The client's own task (``api.watch``) then catches up from the log at its own pace and joins
again. Which events a client receives is decided there, by its cursor; the hub only promises
that every event appended after a subscriber registered is offered to it, in order, unless
it overflowed.

Subscribers are woken a slice at a time (``Waker``), not all at once. asyncio runs every
callback that is ready at the start of a loop iteration before it looks at sockets again,
so waking 5,000 clients in one go makes one iteration as long as 5,000 socket writes
(hundreds of ms on a busy core), and every request handler, Redis reply and cancel waits
that long per ``await``. In slices, an iteration holds a bounded number of writes and
everything else on the loop keeps moving while a large fan-out is written. A client that
is already waiting to be woken is not queued twice: its frames pile up in its buffer and
go out in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, Self

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.typing import KeyT, StreamIdT

from api.sse import encode_event
from broker import keys, metrics
from broker.closing import AsyncCloseable
from broker.events import Event, entry_id, seq_from_entry_id

logger = logging.getLogger("streambroker.hub")

#: Most entries one XREAD takes from each stream; a larger backlog takes several rounds.
READ_COUNT = 512
#: Longest one blocking read waits; wakes and new events end it sooner.
BLOCK_MS = 10_000
#: Pause before the read is tried again after Redis failed.
RETRY_SECONDS = 0.5

#: gone: the stream expired or was deleted; lost: its log is shorter than what the hub
#: already read (Redis lost events); shutdown: the process is stopping.
CloseReason = Literal["gone", "lost", "shutdown"]

#: How the hub's connection shows in Redis's CLIENT LIST (the api pool's is "streambroker-api").
HUB_CLIENT_NAME = "streambroker-hub"
#: Subscribers woken per loop iteration. Each woken client writes to its socket (tens of µs
#: under load), so this bounds an iteration at a few ms of writes.
WAKE_SLICE = 64


@dataclass(frozen=True, slots=True)
class Frame:
    """One event as every subscriber receives it: encoded once, shared."""

    seq: int
    data: bytes
    terminal: bool


class Subscription:
    """One client's place in live delivery: a bounded buffer the hub fills without waiting."""

    def __init__(self, stream_id: str, limit: int, waker: Waker) -> None:
        self.stream_id = stream_id
        self._limit = limit
        self._waker = waker
        self._frames: deque[Frame] = deque()
        #: The client's task, parked in ``take`` until there is something for it.
        self._waiter: asyncio.Future[None] | None = None
        #: In the waker's queue already; more frames just join the buffer.
        self.wake_queued = False
        #: When it joined the waker's queue (monotonic clock), for the hub lag metric.
        self.queued_at = 0.0
        #: The heartbeat tick came: ``take`` returns even with nothing buffered.
        self._ping_due = False
        #: Set when the buffer was full: the client must catch up from the log and rejoin.
        self.overflowed = False
        #: Why live delivery ended for good: the stream is gone, or the process shuts down.
        self.closed: CloseReason | None = None
        #: The hub had already offered events past the subscriber's cursor when it joined:
        #: those must be read from the log (the hand-over read). Otherwise every event past
        #: the cursor is still to be offered, and no read is needed.
        self.behind = False

    def offer(self, frame: Frame) -> None:
        """Called by the hub; never blocks. A full buffer ends this subscription's live life."""
        if self.overflowed or self.closed:
            return
        if len(self._frames) >= self._limit:
            self.overflowed = True
            self._frames.clear()  # the client re-reads these from the log anyway
        else:
            self._frames.append(frame)
        self._waker.schedule(self)

    def close(self, reason: CloseReason) -> None:
        """End live delivery now; not through the waker, which may be stopping too."""
        self.closed = reason
        self._resolve()

    def poke(self) -> None:
        """The hub's heartbeat tick: wake the client so it writes a ping if it has nothing."""
        self._ping_due = True
        self._waker.schedule(self)

    def wake(self) -> None:
        """Called by the waker: let the client's task run ``take`` to its end."""
        self.wake_queued = False
        self._resolve()

    def _resolve(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Frame]:
        """Every buffered frame, waiting for one; [] when woken by the heartbeat tick.

        No timer per wait: a timeout here would be armed and cancelled once per event per
        client, which profiling showed to be a fifth of the api's CPU under fan-out. The
        hub's single tick (``poke``) replaces them all.
        """
        while not (self._frames or self._ping_due or self.overflowed or self.closed):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._ping_due = False
        frames = list(self._frames)
        self._frames.clear()
        return frames


class Waker:
    """Wakes subscribers in slices of ``WAKE_SLICE``, one slice per loop iteration.

    Why not all at once: see the module's docstring. The queue is first in, first out, so
    every client waits at most one pass over the clients ahead of it.
    """

    def __init__(self, slice_size: int = WAKE_SLICE) -> None:
        self._slice = slice_size
        self._queue: deque[Subscription] = deque()
        self._pending: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def schedule(self, subscription: Subscription) -> None:
        if subscription.wake_queued:
            return
        subscription.wake_queued = True
        subscription.queued_at = time.monotonic()
        self._queue.append(subscription)
        pending = self._pending
        if pending is not None and not pending.done():
            pending.set_result(None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            if not queue:
                self._pending = loop.create_future()
                try:
                    await self._pending
                finally:
                    self._pending = None
            # Lag, once per slice: how long its first subscriber waited to be woken.
            metrics.HUB_LAG.observe(time.monotonic() - queue[0].queued_at)
            for _ in range(min(self._slice, len(queue))):
                queue.popleft().wake()
            # The woken tasks run before this one resumes, and the loop polls its sockets
            # before the next slice.
            await asyncio.sleep(0)


class _Channel:
    """A watched stream: the hub's read position in its log, and its live subscribers."""

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.subscribers: set[Subscription] = set()


class ReaderHub(AsyncCloseable):
    def __init__(
        self, redis_url: str, shared: aioredis.Redis, *, buffer_frames: int, check_seconds: float
    ) -> None:
        # The blocking read holds its connection for up to BLOCK_MS, so it gets its own.
        self._reader = aioredis.Redis(
            connection_pool=aioredis.ConnectionPool.from_url(
                redis_url, max_connections=1, client_name=HUB_CLIENT_NAME
            )
        )
        self._shared = shared
        self._buffer_frames = buffer_frames
        self._check_seconds = check_seconds
        self._channels: dict[str, _Channel] = {}
        self._wake_key = keys.hub_wake_key(secrets.token_hex(8))
        self._wake_cursor = "0-0"
        self._wake_pending = False
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._wakes: set[asyncio.Task[None]] = set()
        self._waker = Waker()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="hub-read"),
            asyncio.create_task(self._check_loop(), name="hub-check"),
            asyncio.create_task(self._waker.run(), name="hub-waker"),
        ]

    async def aclose(self) -> None:
        self.drain()
        tasks = [*self._tasks, *self._wakes]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(redis_errors.RedisError, OSError):
            await self._shared.delete(self._wake_key)
        await self._reader.aclose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    def drain(self) -> None:
        """End every subscription now (the process is shutting down); refuse new ones."""
        self._draining = True
        for channel in self._channels.values():
            for subscription in channel.subscribers:
                subscription.close("shutdown")

    # -- subscriptions -----------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        return sum(len(c.subscribers) for c in self._channels.values())

    @property
    def stream_count(self) -> int:
        return len(self._channels)

    def subscribe(self, stream_id: str, after_seq: int) -> Subscription:
        """Register for every event of ``stream_id`` the hub reads from now on.

        ``after_seq`` is where the caller's own reading of the log got to: a stream no one
        here watched yet is tailed from there, so nothing the caller lacks is skipped. On a
        stream already tailed past ``after_seq``, the subscription is marked ``behind``.
        """
        subscription = Subscription(stream_id, self._buffer_frames, self._waker)
        if self._draining:
            subscription.close("shutdown")
            return subscription
        channel = self._channels.get(stream_id)
        if channel is None:
            channel = self._channels[stream_id] = _Channel(after_seq)
            self._wake()
        else:
            subscription.behind = channel.cursor > after_seq
        channel.subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        channel = self._channels.get(subscription.stream_id)
        if channel is None:
            return
        channel.subscribers.discard(subscription)
        if not channel.subscribers:
            # The next read leaves it out; an in-flight one finds no channel and drops it.
            del self._channels[subscription.stream_id]

    # -- reading -----------------------------------------------------------------------

    def _wake(self) -> None:
        """End the blocking read early, so it includes a newly watched stream."""
        if self._wake_pending:
            return
        self._wake_pending = True
        task = asyncio.create_task(self._send_wake())
        self._wakes.add(task)
        task.add_done_callback(self._wakes.discard)

    async def _send_wake(self) -> None:
        try:
            async with self._shared.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": "1"}, maxlen=16, approximate=True)
                pipe.expire(self._wake_key, 3600)
                await pipe.execute()
        except (redis_errors.RedisError, OSError) as exc:
            # The read still picks the stream up when its block times out.
            logger.warning("could not wake the hub's read: %s", exc)
        finally:
            self._wake_pending = False

    async def _read_loop(self) -> None:
        while True:
            try:
                await self._read_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Subscribers keep their place; the read resumes from the same cursors.
                logger.warning("hub read failed, retrying in %.1fs: %s", RETRY_SECONDS, exc)
                await asyncio.sleep(RETRY_SECONDS)

    async def _read_once(self) -> None:
        streams: dict[KeyT, StreamIdT] = {self._wake_key: self._wake_cursor}
        for stream_id, channel in self._channels.items():
            streams[keys.log_key(stream_id)] = entry_id(channel.cursor)
        reply = await self._reader.xread(streams, count=READ_COUNT, block=BLOCK_MS)
        for raw_key, entries in reply or ():
            key = raw_key.decode()
            if key == self._wake_key:
                self._wake_cursor = entries[-1][0].decode()
                continue
            self._fan_out(keys.stream_id_of(key), entries)

    def _fan_out(self, stream_id: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        channel = self._channels.get(stream_id)
        if channel is None:
            return  # every subscriber left while the read was in flight
        field = keys.EVENT_FIELD.encode()
        for raw_id, fields in entries:
            seq = seq_from_entry_id(raw_id)
            if seq <= channel.cursor:
                continue  # a read issued before the channel was re-created
            event = Event.decode(fields[field], seq)
            frame = Frame(seq, encode_event(event), event.terminal)
            channel.cursor = seq
            for subscription in channel.subscribers:
                subscription.offer(frame)
            if frame.terminal:
                # Nothing follows a terminal event; subscribers end and leave by themselves.
                del self._channels[stream_id]
                return

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self._check_seconds)
            await self._tick()

    async def _tick(self) -> None:
        """Every heartbeat: poke every subscriber (idle ones write a ping), and end the
        subscriptions of streams that no longer exist (expired or deleted) or whose log is
        now shorter than what was read (Redis lost events: no further event would ever
        reach these clients, and their reconnect is answered with ``log_lost``).

        A method of its own so that its locals (subscriptions) die with each tick instead
        of living on in the loop's frame.
        """
        for live in self._channels.values():
            for subscription in live.subscribers:
                subscription.poke()
        # Cursors as they are before asking: the hub may read on while the answer travels,
        # and a cursor that moved meanwhile must not look like a log that shrank.
        watched = {stream_id: channel.cursor for stream_id, channel in self._channels.items()}
        if not watched:
            return
        try:
            async with self._shared.pipeline(transaction=False) as pipe:
                for stream_id in watched:
                    pipe.hget(keys.meta_key(stream_id), "last_seq")
                found = await pipe.execute()
        except (redis_errors.RedisError, OSError) as exc:
            logger.warning("hub check failed: %s", exc)
            return
        for (stream_id, cursor), last_seq in zip(watched.items(), found, strict=True):
            channel = self._channels.get(stream_id)
            if channel is None:
                continue
            reason: CloseReason | None = None
            if last_seq is None:
                reason = "gone"
            elif int(last_seq) < cursor:
                reason = "lost"
            if reason is not None:
                for subscription in channel.subscribers:
                    subscription.close(reason)
                del self._channels[stream_id]
