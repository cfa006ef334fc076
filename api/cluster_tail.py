"""How the reader hub learns of new events on a Redis Cluster.

On one Redis the hub tails every watched log with one blocking ``XREAD`` (``api.hub``). A
cluster refuses that: one command may only name keys of one slot (``CROSSSLOT``, even when
one node serves them all), and each generation has a slot of its own. Blocking reads per
generation would cost a connection per watched generation.

So on a cluster every append also publishes the generation's new last sequence number on its
sharded Pub/Sub channel (``keys.pulse_channel``, in the append script: the pulse leaves with
the events, or not at all), and the hub

- holds one Pub/Sub connection per node that owns watched generations (``_NodeListener``),
  subscribed (``SSUBSCRIBE``) to the channels of the generations it watches there: Redis
  connections per api process are bounded by the number of nodes, not of clients;
- reads a generation's log when its channel pulses, with a plain ``XREAD`` (not blocking)
  through the api's shared cluster client, which follows ``MOVED`` and ``ASK``; the reads of
  everything that pulsed meanwhile go in one pipeline.

A subscription is confirmed before its first read: what was appended before it is in that
read, what is appended after it pulses. Pulses are a wake-up, not the data: one that is lost
(a listener reconnecting, a slot moving to another node during a failover or a resharding)
loses nothing but time, because

- a listener whose connection fails, or whose node stops serving a channel (``MOVED`` to its
  ``SSUBSCRIBE``, ``SUNSUBSCRIBE`` from the server when the slot leaves), has its
  generations routed again from a fresh slot map, and each is read once subscribed again;
- the hub's periodic check (``ReaderHub._check_logs``, every ≤ 2 s) compares each log's
  last sequence number with the hub's cursor and calls ``behind`` for the logs that moved
  without a pulse, and ``reconcile`` re-routes every generation whose slot changed owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.crc import key_slot

from broker import keys
from broker.events import entry_id

logger = logging.getLogger("streambroker.hub")

#: Most entries one read takes from a log; a longer backlog is read again at once.
READ_COUNT = 512
#: Most logs read in one pipeline.
READS_PER_ROUND = 256
#: Pause before routing or reading again after Redis failed.
RETRY_SECONDS = 0.5
#: A listener that has heard nothing for this long pings its node; one that still hears
#: nothing a period later has lost it (a node that died without closing the connection).
LISTENER_PING_SECONDS = 5.0

Entries = list[tuple[bytes, dict[bytes, bytes]]]


class _Watched(Protocol):
    """What the tail needs of the hub's channel: where the hub's reading got to."""

    cursor: int


class ClusterTail:
    def __init__(
        self,
        redis: RedisCluster,
        channels: Mapping[str, _Watched],
        fan_out: Callable[[str, Entries], None],
        *,
        client_name: str,
    ) -> None:
        """``channels``: the hub's watched generations (read, never changed here);
        ``fan_out``: called with every batch of new entries of one."""
        self._redis = redis
        self._channels = channels
        self._fan_out = fan_out
        self._client_name = client_name
        #: Node name → its listener.
        self._listeners: dict[str, _NodeListener] = {}
        #: Generation → the node whose listener subscribed it (or is subscribing it).
        self._routes: dict[str, str] = {}
        #: Generations newly watched, to subscribe at the next routing.
        self._unrouted: set[str] = set()
        self._route_needed = asyncio.Event()
        #: Generations to read at the next round.
        self._due: set[str] = set()
        self._news = asyncio.Event()
        self._map_stale = False

    # -- what the hub tells -------------------------------------------------------------

    def watch(self, stream_id: str) -> None:
        """A generation is watched now: subscribe its channel, and read it (once more when
        the subscription is confirmed: what was appended before that is in that read)."""
        self._unrouted.add(stream_id)
        self._route_needed.set()
        self._mark_due(stream_id)

    def behind(self, stream_id: str) -> None:
        """The log holds events past the hub's cursor: read it (a pulse went missing)."""
        self._mark_due(stream_id)

    def reconcile(self) -> None:
        """Drop the subscriptions of generations no longer watched (and the connections
        left with none), and move those whose slot is served by another node now (the
        shared client learnt a new slot map)."""
        if not self._channels and not self._routes and not self._listeners:
            return  # nothing watched, nothing held
        self._unrouted.update(self._channels)
        self._unrouted.update(self._routes)
        self._route_needed.set()

    @property
    def connection_count(self) -> int:
        """Pub/Sub connections held: at most one per node."""
        return len(self._listeners)

    # -- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Route subscriptions and read logs until cancelled."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._route_loop(), name="hub-route")
                group.create_task(self._read_loop(), name="hub-read")
        finally:
            for listener in list(self._listeners.values()):
                await listener.aclose()
            self._listeners.clear()

    async def _route_loop(self) -> None:
        while True:
            await self._route_needed.wait()
            self._route_needed.clear()
            try:
                await self._route()
            except Exception as exc:
                # Redis's errors, and redis-py's own while the slot map is in flux (a slot
                # no node serves yet, mid-failover): never let the hub stop listening.
                logger.warning("hub could not subscribe (%s); again in %.1fs", exc, RETRY_SECONDS)
                self._map_stale = True
                await asyncio.sleep(RETRY_SECONDS)
                self._route_needed.set()

    async def _route(self) -> None:
        if self._map_stale:
            self._map_stale = False
            await self._redis.nodes_manager.initialize()
        else:
            await self._redis.initialize()  # once: learns the slot map
        pending, self._unrouted = self._unrouted, set()
        try:
            for stream_id in pending:
                await self._route_one(stream_id)
        except BaseException:
            self._unrouted |= pending  # the rest; routing one twice does no harm
            raise
        for name, listener in list(self._listeners.items()):
            if not listener.subscribed:
                del self._listeners[name]
                await listener.aclose()

    async def _route_one(self, stream_id: str) -> None:
        routed = self._routes.get(stream_id)
        if stream_id not in self._channels:
            if routed is not None:
                del self._routes[stream_id]
                if (listener := self._listeners.get(routed)) is not None:
                    await listener.unsubscribe(stream_id)
            return
        node = self._owner(stream_id)
        if routed == node.name:
            return
        if routed is not None and (old := self._listeners.get(routed)) is not None:
            await old.unsubscribe(stream_id)
        listener = self._listeners.get(node.name)
        if listener is None:
            listener = self._listeners[node.name] = _NodeListener(node, self, self._client_name)
        try:
            await listener.subscribe(stream_id)
        except BaseException:
            if not listener.subscribed and self._listeners.get(node.name) is listener:
                del self._listeners[node.name]
                await listener.aclose()
            raise
        self._routes[stream_id] = node.name

    def _owner(self, stream_id: str) -> ClusterNode:
        slot = key_slot(keys.pulse_channel(stream_id).encode())
        node: ClusterNode = self._redis.nodes_manager.get_node_from_slot(slot)
        return node

    # -- what the listeners tell --------------------------------------------------------

    def pulsed(self, stream_id: str) -> None:
        self._mark_due(stream_id)

    def unrouted(self, stream_ids: set[str], reason: str) -> None:
        """These generations lost their subscription (a failed listener, a slot that left
        its node): route them again from a fresh slot map, and read them meanwhile."""
        logger.info("hub re-subscribing %d stream(s): %s", len(stream_ids), reason)
        for stream_id in stream_ids:
            self._routes.pop(stream_id, None)
            self._mark_due(stream_id)
        self._unrouted |= stream_ids
        self._map_stale = True
        self._route_needed.set()

    def listener_lost(self, listener: _NodeListener, reason: str) -> None:
        if self._listeners.get(listener.node.name) is listener:
            del self._listeners[listener.node.name]
        lost = {s for s, name in self._routes.items() if name == listener.node.name}
        self.unrouted(lost, reason)

    # -- reading ------------------------------------------------------------------------

    def _mark_due(self, stream_id: str) -> None:
        self._due.add(stream_id)
        self._news.set()

    async def _read_loop(self) -> None:
        while True:
            await self._news.wait()
            self._news.clear()
            try:
                await self._read_due()
            except Exception as exc:  # as in ``_route_loop``: the reads must go on
                logger.warning("hub read failed, retrying in %.1fs: %s", RETRY_SECONDS, exc)
                await asyncio.sleep(RETRY_SECONDS)
                self._news.set()

    async def _read_due(self) -> None:
        due = [s for s in self._due if s in self._channels]
        self._due.clear()
        for start in range(0, len(due), READS_PER_ROUND):
            batch = due[start : start + READS_PER_ROUND]
            try:
                replies = await self._read(batch)
            except BaseException:
                self._due.update(due[start:])  # read again at the next round
                raise
            for stream_id, reply in zip(batch, replies, strict=True):
                if not reply:
                    continue
                ((_, entries),) = reply
                self._fan_out(stream_id, entries)
                if len(entries) >= READ_COUNT:
                    self._mark_due(stream_id)  # more behind these

    async def _read(self, stream_ids: list[str]) -> list[Any]:
        """One non-blocking ``XREAD`` per log, from the hub's cursor, in one pipeline."""
        async with self._redis.pipeline() as pipe:
            for stream_id in stream_ids:
                channel = self._channels.get(stream_id)
                cursor = channel.cursor if channel is not None else 0
                pipe.xread({keys.log_key(stream_id): entry_id(cursor)}, count=READ_COUNT)
            replies: list[Any] = await pipe.execute()
        return replies


class _NodeListener:
    """One Pub/Sub connection to one node, subscribed to the channels of the generations
    the hub watches there."""

    def __init__(self, node: ClusterNode, tail: ClusterTail, client_name: str) -> None:
        self.node = node
        self._tail = tail
        self._connection: Connection = node.connection_class(
            **{**node.connection_kwargs, "client_name": client_name}
        )
        #: Generations subscribed (or being subscribed) here.
        self.subscribed: set[str] = set()
        #: Generations this listener is unsubscribing: the server's confirmation is expected.
        self._leaving: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._ping_sent = False

    async def subscribe(self, stream_id: str) -> None:
        """Send ``SSUBSCRIBE``; its confirmation (read by the listening task) makes the
        generation due for reading."""
        if self._task is None:
            await self._connection.connect()  # type: ignore[no-untyped-call]
            self._task = asyncio.create_task(self._listen(), name=f"hub-listen-{self.node.name}")
        self.subscribed.add(stream_id)
        self._leaving.discard(stream_id)
        await self._connection.send_command("SSUBSCRIBE", keys.pulse_channel(stream_id))

    async def unsubscribe(self, stream_id: str) -> None:
        if stream_id not in self.subscribed:
            return
        self.subscribed.discard(stream_id)
        self._leaving.add(stream_id)
        with contextlib.suppress(redis_errors.RedisError, OSError):
            await self._connection.send_command("SUNSUBSCRIBE", keys.pulse_channel(stream_id))

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._connection.disconnect()

    async def _listen(self) -> None:
        try:
            while True:
                try:
                    reply = await self._connection.read_response(timeout=LISTENER_PING_SECONDS)
                except redis_errors.ResponseError as exc:
                    # A refused SSUBSCRIBE (``MOVED``: the slot is served elsewhere now);
                    # which one is not said, so every channel here is routed again.
                    await self._lose(f"{self.node.name} refused a subscription: {exc}")
                    return
                if reply is None:
                    if self._ping_sent:
                        raise redis_errors.ConnectionError("no answer to a ping")
                    self._ping_sent = True
                    await self._connection.send_command("PING")
                    continue
                self._ping_sent = False
                self._heard(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever it was, its generations must be heard again
            await self._lose(f"lost the connection to {self.node.name}: {exc}")

    def _heard(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 2:
            return
        kind = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        channel = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        if kind not in {"smessage", "ssubscribe", "sunsubscribe"}:
            return  # "pong"
        stream_id = keys.stream_id_of(channel)
        if kind != "sunsubscribe":
            if stream_id in self.subscribed:
                self._tail.pulsed(stream_id)
        elif stream_id in self._leaving:
            self._leaving.discard(stream_id)
        elif stream_id in self.subscribed:
            # The server's own: the slot left this node (a failover, a resharding).
            self.subscribed.discard(stream_id)
            self._tail.unrouted({stream_id}, f"its slot left {self.node.name}")

    async def _lose(self, reason: str) -> None:
        """Give up this connection: its generations are routed again (maybe to this node,
        through a new listener)."""
        self._task = None
        self.subscribed.clear()
        self._tail.listener_lost(self, reason)
        await self._connection.disconnect()
