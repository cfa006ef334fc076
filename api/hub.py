"""One reader per api process: it tails every stream local clients watch and fans out.

However many clients are connected, the process reads Redis through one dedicated
connection: a single blocking ``XREAD`` over every watched stream's log (plus this hub's
own *wake* stream, so that a newly watched stream joins the read at once instead of when the
block times out). A Redis Cluster refuses such a read (the logs live in many slots): there
the hub learns of new events from the appends' sharded Pub/Sub pulses instead, one
connection per node, and reads the logs that pulsed (``api.cluster_tail``). Each event read
is encoded to SSE bytes once, and the same bytes are offered to every subscriber of that
stream, each read's new events of a stream as one ``Batch``: clients waiting at the live tail
get it as one write straight to their connections (``api.live_writes``).

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
import time
from typing import Self

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.typing import KeyT, StreamIdT

from api.cluster_tail import ClusterTail
from api.sse import encode_event
from api.subscription import Batch, CloseReason, Frame, Subscription, Waker
from broker import keys, metrics, store_connections
from broker.closing import AsyncCloseable
from broker.events import Event, entry_id, seq_from_entry_id
from broker.store_connections import StoreClient
from broker.store_url import StoreAddress, parse_store_url

# The subscriber's side of the hub lives in ``api.subscription``; its names stay importable
# from here, where handlers and tests meet the hub.
__all__ = ["Batch", "CloseReason", "Frame", "ReaderHub", "Subscription", "Waker"]

logger = logging.getLogger("streambroker.hub")

#: Most entries one XREAD takes from each stream; a larger backlog takes several rounds.
READ_COUNT = 512
#: Longest one blocking read waits; wakes and new events end it sooner.
BLOCK_MS = 10_000
#: The same behind Sentinel: each read is also when the hub's connection is checked against
#: the Sentinels' master (``broker.store_connections``), so a read never sits for long on
#: a master that was replaced while the connection stayed open (``SENTINEL FAILOVER``).
FOLLOWING_SENTINEL_BLOCK_MS = 1_000
#: Pause before the read is tried again after Redis failed.
RETRY_SECONDS = 0.5
#: Longest between two checks that the logs read still hold what was read, whatever the
#: heartbeat: after a failover or a restart a log may have a shorter history, and a reader
#: past its end must be let go within seconds rather than wait, pinged, for events that the
#: new history will put under ids it already holds.
STORE_CHECK_SECONDS = 2.0

#: How the hub's connection shows in Redis's CLIENT LIST (the api pool's is "streambroker-api").
HUB_CLIENT_NAME = "streambroker-hub"


class _Channel:
    """A watched stream: the hub's read position in its log, and its live subscribers."""

    def __init__(self, cursor: int) -> None:
        self.cursor = cursor
        self.subscribers: set[Subscription] = set()


class ReaderHub(AsyncCloseable):
    def __init__(
        self,
        store: StoreAddress | str,
        shared: StoreClient,
        *,
        buffer_frames: int,
        check_seconds: float,
    ) -> None:
        """``store``: ``REDIS_URL``, or what ``parse_store_url`` made of it."""
        if isinstance(store, str):
            store = parse_store_url(store)
        self._channels: dict[str, _Channel] = {}
        #: On a Redis Cluster, how new events are learnt of instead of the blocking read.
        self._tail: ClusterTail | None = None
        self._reader: aioredis.Redis | None = None
        if store.cluster is not None:
            assert isinstance(shared, RedisCluster), "a cluster's hub reads through its client"
            self._tail = ClusterTail(
                shared, self._channels, self._fan_out, client_name=HUB_CLIENT_NAME
            )
        else:
            # The blocking read holds its connection for up to a block, so it gets its own.
            self._reader = aioredis.Redis.from_pool(
                store_connections.pool(store, client_name=HUB_CLIENT_NAME, max_connections=1)
            )
        self._block_ms = FOLLOWING_SENTINEL_BLOCK_MS if store.follows_failover else BLOCK_MS
        self._shared = shared
        self._buffer_frames = buffer_frames
        self._check_seconds = check_seconds
        self._wake_key = keys.hub_wake_key(secrets.token_hex(8))
        self._wake_cursor = "0-0"
        self._wake_pending = False
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._wakes: set[asyncio.Task[None]] = set()
        self._waker = Waker()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        reading = self._read_loop() if self._tail is None else self._tail.run()
        self._tasks = [
            asyncio.create_task(reading, name="hub-read"),
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
        if self._reader is not None:
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
            self._wake(stream_id)
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

    def _wake(self, stream_id: str) -> None:
        """End the blocking read early, so it includes a newly watched stream (on a
        cluster: subscribe to its pulses)."""
        if self._tail is not None:
            self._tail.watch(stream_id)
            return
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
        assert self._reader is not None  # one Redis: the cluster's hub reads in its tail
        streams: dict[KeyT, StreamIdT] = {self._wake_key: self._wake_cursor}
        for stream_id, channel in self._channels.items():
            streams[keys.log_key(stream_id)] = entry_id(channel.cursor)
        reply = await self._reader.xread(streams, count=READ_COUNT, block=self._block_ms)
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
        frames: list[Frame] = []
        for raw_id, fields in entries:
            seq = seq_from_entry_id(raw_id)
            if seq <= channel.cursor:
                continue  # a read issued before the channel was re-created
            event = Event.decode(fields[field], seq)
            frames.append(Frame(seq, encode_event(event), event.terminal))
            channel.cursor = seq
            if event.terminal:
                break  # nothing follows a terminal event
        if not frames:
            return
        batch = Batch(frames)
        written = 0
        for subscription in channel.subscribers:
            try:
                written += subscription.offer_batch(batch)
            except Exception:
                # One client's trouble must never cost the others this batch (or, on the
                # terminal one, their end): that client alone ends, and resumes later.
                logger.exception("stream %s: a subscriber failed; ending its response", stream_id)
                subscription.close("failed")
        if written:
            # Counted once per batch: a counter's lock per client write would show.
            metrics.EVENTS_SENT.inc(written)
            metrics.EVENTS_WRITTEN_LIVE.inc(written)
        if batch.terminal:
            # Subscribers end and leave by themselves.
            del self._channels[stream_id]

    async def _check_loop(self) -> None:
        interval = min(self._check_seconds, STORE_CHECK_SECONDS)
        next_poke = time.monotonic() + self._check_seconds
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() >= next_poke:
                next_poke = time.monotonic() + self._check_seconds
                self._poke()
            try:
                await self._check_logs()
            except Exception:
                # The heartbeats and the checks of every client ride on this loop.
                logger.exception("hub check failed; checking again in %.1fs", interval)

    def _poke(self) -> None:
        """Every heartbeat: poke every subscriber (idle ones write a ping)."""
        for live in self._channels.values():
            for subscription in live.subscribers:
                try:
                    subscription.poke()
                except Exception:
                    logger.exception("a subscriber failed its heartbeat; ending its response")
                    subscription.close("failed")

    async def _check_logs(self) -> None:
        """End the subscriptions of streams that no longer exist (expired or deleted), or
        whose log no longer holds what was read: it is shorter than the hub's cursor, or
        the store recorded events from the cursor or before as lost (``lost_from_seq``: a
        failover or a crash replaced the history, and what is appended now takes ids these
        clients already hold). No further event would reach them; their reconnect is
        answered with ``log_lost``.

        A method of its own so that its locals (subscriptions) die with each check instead
        of living on in the loop's frame.
        """
        # Cursors as they are before asking: the hub may read on while the answer travels,
        # and a cursor that moved meanwhile must not look like a log that shrank.
        watched = {stream_id: channel.cursor for stream_id, channel in self._channels.items()}
        if self._tail is not None:
            self._tail.reconcile()
        if not watched:
            return
        try:
            async with self._shared.pipeline(transaction=False) as pipe:
                for stream_id in watched:
                    pipe.hmget(
                        keys.meta_key(stream_id),
                        [keys.MetaField.LAST_SEQ, keys.MetaField.LOST_FROM_SEQ],
                    )
                found = await pipe.execute()
        except (redis_errors.RedisError, OSError) as exc:
            logger.warning("hub check failed: %s", exc)
            return
        for (stream_id, cursor), (last_seq, lost_from) in zip(watched.items(), found, strict=True):
            channel = self._channels.get(stream_id)
            if channel is None:
                continue
            reason: CloseReason | None = None
            if last_seq is None:
                reason = "gone"
            elif int(last_seq) < cursor or (lost_from is not None and int(lost_from) <= cursor):
                reason = "lost"
            if reason is not None:
                for subscription in channel.subscribers:
                    subscription.close(reason)
                del self._channels[stream_id]
            elif self._tail is not None and int(last_seq) > channel.cursor:
                self._tail.behind(stream_id)  # no pulse came (yet): read it anyway
