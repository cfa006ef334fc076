"""One reader per api process: it tails every stream local clients watch and fans out.

However many clients are connected, the process reads Redis through one dedicated
connection: a single blocking ``XREAD`` over every watched stream's log (plus this hub's
own *wake* stream, so that a newly watched stream joins the read at once instead of when the
block times out). Each event read is encoded to SSE bytes once, and the same bytes are
offered to every subscriber of that stream.

The hub never waits for a subscriber: ``Subscription.offer`` appends to a bounded buffer or,
when the buffer is full, drops the subscription from live delivery, and subscribers are woken
a slice at a time (``api.subscription`` says why). Which events a client receives is decided
by its own cursor (``api.watch``); the hub only promises that every event appended after a
subscriber registered is offered to it, in order, unless it overflowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Self

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.typing import KeyT, StreamIdT

from api.sse import encode_event
from api.subscription import CloseReason, Frame, Subscription, Waker
from broker import keys
from broker.closing import AsyncCloseable
from broker.events import Event, entry_id, seq_from_entry_id

# The subscriber's side of the hub lives in ``api.subscription``; its names stay importable
# from here, where handlers and tests meet the hub.
__all__ = ["CloseReason", "Frame", "ReaderHub", "Subscription", "Waker"]

logger = logging.getLogger("streambroker.hub")

#: Most entries one XREAD takes from each stream; a larger backlog takes several rounds.
READ_COUNT = 512
#: Longest one blocking read waits; wakes and new events end it sooner.
BLOCK_MS = 10_000
#: Pause before the read is tried again after Redis failed.
RETRY_SECONDS = 0.5

#: How the hub's connection shows in Redis's CLIENT LIST (the api pool's is "streambroker-api").
HUB_CLIENT_NAME = "streambroker-hub"


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
                pipe.xadd(self._wake_key, {keys.HUB_WAKE_FIELD: "1"}, maxlen=16, approximate=True)
                pipe.expire(self._wake_key, keys.HUB_WAKE_SECONDS)
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
                    pipe.hget(keys.meta_key(stream_id), keys.MetaField.LAST_SEQ)
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
