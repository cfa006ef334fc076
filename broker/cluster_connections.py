"""Connections to a Redis Cluster (``REDIS_URL=redis+cluster://…``, ``broker.store_url``).

Two kinds, for two kinds of caller:

- ``cluster_client``: redis-py's cluster client, for everything keyed by a generation (its
  scripts, its log, its meta hash) and for reads that gather from many slots (a listing's
  page of meta hashes). It learns the slot map from the seed nodes, follows ``MOVED`` and
  ``ASK``, and learns the map again when a node fails over. The api's is bounded
  (``BoundedRedisCluster``): redis-py's cluster client fails a command at once when a
  node's connections are all in use, where the api's requests should wait their turn.
- ``control_slot_pool``: a plain connection pool aimed at whichever master owns the control
  slot (``keys.CONTROL_TAG``), for arq. arq's worker is written for one Redis: it watches a
  job's in-progress key and runs ``MULTI`` over it, the job record and the queue, which the
  cluster client cannot do. Those keys all share the control slot, so one node serves all of
  arq's commands, and a plain connection to it is all arq needs, provided it follows the
  slot when it moves. A connection asks the seed nodes which master owns the slot when it
  is made; one answered ``MOVED`` (a failover or a resharding moved the slot) or
  ``CLUSTERDOWN`` is dropped and its command fails as a ``ConnectionError``, which every
  caller rides out as a blip of the store, and the next connection goes where the slot is
  now.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import ConnectionPool
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import Connection
from redis.crc import key_slot

from broker import keys
from broker.store_url import ClusterSeeds

#: How long making a connection to a node may take; one that does not answer by then is
#: treated as down (the next seed is asked).
CONNECT_TIMEOUT_SECONDS = 1.0
#: Longest a command may wait for its reply (none of the broker's block on a cluster). A
#: node that stopped without closing its connections (a frozen machine, SIGSTOP) answers
#: nothing and closes nothing: without this, every command sent to it would wait for good,
#: and redis-py would never learn that its replica took over.
COMMAND_TIMEOUT_SECONDS = 5.0
#: The slot every deployment-wide key (and arq's) lives in.
CONTROL_SLOT = key_slot(keys.QUEUE_NAME.encode())
#: Replies after which a connection no longer serves the control slot where it is.
_MOVED_ON = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")


def cluster_client(
    seeds: ClusterSeeds,
    *,
    client_name: str,
    max_connections: int | None = None,
    command_timeout: float = COMMAND_TIMEOUT_SECONDS,
) -> RedisCluster:
    """redis-py's cluster client on ``seeds``; at most ``max_connections`` per node (more
    at once fail with ``MaxConnectionsError``: the cluster client does not queue them).

    ``require_full_coverage=False``: a shard that is down (between a master's death and its
    replica's promotion) makes only its own slots unavailable, and their commands fail as
    connection errors, which callers ride out; the generations of the other shards go on.
    """
    options = _cluster_options(seeds, client_name, command_timeout)
    if max_connections is not None:
        options["max_connections"] = max_connections
    client: RedisCluster = BrokerRedisCluster(**options)  # type: ignore[abstract]
    return client


def _cluster_options(
    seeds: ClusterSeeds, client_name: str, command_timeout: float
) -> dict[str, Any]:
    return {
        "socket_timeout": command_timeout,
        "startup_nodes": [ClusterNode(host, port) for host, port in seeds.nodes],
        "username": seeds.username,
        "password": seeds.password,
        "client_name": client_name,
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "require_full_coverage": False,
    }


def bounded_cluster_client(
    seeds: ClusterSeeds, *, client_name: str, max_connections: int, wait_seconds: float
) -> BoundedRedisCluster:
    """``cluster_client`` for the api: at most ``max_connections`` commands (or pipelines)
    in flight, so at most that many connections to each node; a command waits up to
    ``wait_seconds`` for its turn, then fails with ``ConnectionError``."""
    return BoundedRedisCluster(  # type: ignore[abstract]
        **_cluster_options(seeds, client_name, COMMAND_TIMEOUT_SECONDS),
        max_connections=max_connections,
        wait_seconds=wait_seconds,
    )


#: Set while the current task (or one it started) holds a turn of a ``BoundedRedisCluster``:
#: redis-py retries a pipeline's redirected commands one by one through ``execute_command``,
#: which must not wait for a second turn (with every turn so held, none would ever come).
_HOLDS_TURN: ContextVar[bool] = ContextVar("holds_cluster_turn", default=False)


class BrokerRedisCluster(RedisCluster):
    """redis-py's cluster client, with two of its races closed:

    - its connections are ``ClusterNodeConnection``s (it has no option for their class:
      it is set where its nodes take it from);
    - its seed nodes are a ``_SeedNodes``: learning the slot map walks them, asking each
      in turn, while a command that lost its connection meanwhile drops its node from them
      ("dictionary changed size during iteration", a 500, under a master's crash).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.connection_kwargs["connection_class"] = ClusterNodeConnection
        manager = self.nodes_manager
        manager.startup_nodes = _SeedNodes(manager.startup_nodes)
        for node in manager.startup_nodes.values():
            node.connection_class = ClusterNodeConnection

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """What a command or a pipeline holds while it runs (nothing: unbounded)."""
        yield

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with _view_reset_is_a_blip():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        super().pipeline(transaction, shard_hint)  # its refusals of both
        return _BrokerClusterPipeline(self)  # type: ignore[abstract]


class _BrokerClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client = self._client
        assert isinstance(client, BrokerRedisCluster)
        async with client.turn():
            with _view_reset_is_a_blip():
                return await super().execute(raise_on_error, allow_redirections)


@contextlib.contextmanager
def _view_reset_is_a_blip() -> Iterator[None]:
    """redis-py's cluster client resets its view of the cluster on a connection error (no
    default node, no nodes) while other commands and pipelines are still reading it; they
    then fail on the missing node (``'NoneType' object has no attribute``). The cluster
    was unreachable for them too: raised as ``ConnectionError``, to be retried."""
    try:
        yield
    except AttributeError as exc:
        if "'NoneType'" not in str(exc):
            raise
        raise redis_errors.ConnectionError(
            f"the cluster client's view was reset under this command ({exc})"
        ) from exc


class _SeedNodes(dict[str, ClusterNode]):
    """A dict whose ``values()`` is a snapshot, safe to walk across awaits while others
    change the dict."""

    def values(self) -> Any:
        return list(super().values())


class BoundedRedisCluster(BrokerRedisCluster):
    """redis-py's cluster client whose commands wait for one of ``max_connections`` turns,
    as ``BlockingConnectionPool`` makes a single Redis's commands wait for a connection.

    A command (or a pipeline, which uses at most one connection per node) holds one turn,
    so no node ever has more than ``max_connections`` of this client's connections in use:
    the cap redis-py enforces by failing (``MaxConnectionsError``) is never reached."""

    def __init__(self, *, max_connections: int, wait_seconds: float, **options: Any) -> None:
        super().__init__(max_connections=max_connections, **options)
        self._turns = asyncio.Semaphore(max_connections)
        self._wait_seconds = wait_seconds

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        if _HOLDS_TURN.get():
            yield
            return
        try:
            await asyncio.wait_for(self._turns.acquire(), self._wait_seconds)
        except TimeoutError:
            raise redis_errors.ConnectionError(
                f"no Redis connection free within {self._wait_seconds:g}s"
            ) from None
        holding = _HOLDS_TURN.set(True)
        try:
            yield
        finally:
            _HOLDS_TURN.reset(holding)
            self._turns.release()

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        async with self._turn():
            yield

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.turn():
            return await super().execute_command(*args, **kwargs)


def control_slot_pool(
    seeds: ClusterSeeds, *, client_name: str, max_connections: int | None = None
) -> ConnectionPool:
    """A pool whose connections go to the master that owns the control slot."""
    return ConnectionPool(
        connection_class=ControlSlotConnection,
        owner=ControlSlotOwner(seeds),
        username=seeds.username,
        password=seeds.password,
        client_name=client_name,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        socket_timeout=COMMAND_TIMEOUT_SECONDS,
        max_connections=max_connections,
    )


class ClusterNodeConnection(Connection):
    """redis-py's connection, failing as a lost connection when it was closed under a
    command in flight.

    On any connection error, redis-py's cluster client resets its view of the cluster by
    closing every connection of every node, those other commands are using too. A command
    whose connection is so closed while it sends or reads then fails on a connection
    object already torn down (``AttributeError``), which no caller takes for a blip of the
    store (a reader or writer gone: ``'NoneType' object has no attribute``; a transport
    closed: uvloop's ``RuntimeError``); it is one, and is raised as one
    (``ConnectionError``), to be retried."""

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().send_packed_command(*args, **kwargs)
        except (AttributeError, RuntimeError) as exc:
            raise self._closed_under_us(exc) from exc

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except (AttributeError, RuntimeError) as exc:
            raise self._closed_under_us(exc) from exc

    def _closed_under_us(self, exc: Exception) -> Exception:
        text = str(exc)
        torn_down = "'NoneType'" in text if isinstance(exc, AttributeError) else "closed" in text
        if not torn_down:
            return exc  # something else: a bug to see
        return redis_errors.ConnectionError(
            f"the connection to {self.host}:{self.port} was closed under this command ({exc})"
        )


class ControlSlotOwner:
    """Which master serves the control slot, as the seed nodes say; asked again after
    ``forget``. Shared by the connections of one pool."""

    def __init__(self, seeds: ClusterSeeds) -> None:
        self.seeds = seeds
        self._known: tuple[str, int] | None = None
        self._asking = asyncio.Lock()

    async def address(self) -> tuple[str, int]:
        async with self._asking:  # one question at a time, not one per new connection
            if self._known is None:
                self._known = await self._ask()
            return self._known

    def moved_to(self, address: tuple[str, int] | None) -> None:
        """The slot is elsewhere now: at ``address`` (a ``MOVED`` names it), or unknown."""
        self._known = address

    async def _ask(self) -> tuple[str, int]:
        errors = []
        for host, port in self.seeds.nodes:
            node = Connection(
                host=host,
                port=port,
                username=self.seeds.username,
                password=self.seeds.password,
                socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
                socket_timeout=CONNECT_TIMEOUT_SECONDS,
            )
            try:
                await node.send_command("CLUSTER", "SLOTS")
                ranges = await node.read_response()
            except (redis_errors.RedisError, OSError) as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            finally:
                await node.disconnect()
            for first, last, master, *_ in ranges:
                if int(first) <= CONTROL_SLOT <= int(last):
                    found_host = master[0].decode() if isinstance(master[0], bytes) else master[0]
                    return found_host or host, int(master[1])
            errors.append(f"{host}:{port}: no master serves slot {CONTROL_SLOT}")
        raise redis_errors.ConnectionError(
            f"no seed node names the master of the control slot: {'; '.join(errors)}"
        )


class ControlSlotConnection(Connection):
    """A connection to the control slot's master, made wherever the slot is now."""

    def __init__(self, *, owner: ControlSlotOwner, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.owner = owner

    async def connect(self) -> None:
        if not self.is_connected:
            self.host, self.port = await self.owner.address()
        try:
            await super().connect()  # type: ignore[no-untyped-call]
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
            # Down (killed, its machine gone): the seeds may name its replica by now.
            self.owner.moved_to(None)
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError):
            self.owner.moved_to(None)  # the connection died with its node, maybe
            raise
        except redis_errors.ResponseError as exc:
            words = str(exc).split()
            if not words or words[0] not in _MOVED_ON or _names_another_slot(words):
                raise  # a key outside the control slot: a bug to see, not a move
            self.owner.moved_to(_moved_address(words))
            await self.disconnect()
            raise redis_errors.ConnectionError(
                f"the control slot is not served here any more ({exc}); reconnecting"
            ) from exc


def _names_another_slot(words: list[str]) -> bool:
    """``MOVED``/``ASK`` about a slot other than the control slot: the command's key is
    not one of arq's (which the control slot holds), and where that slot lives says
    nothing about where the control slot does."""
    return words[0] in ("MOVED", "ASK") and len(words) > 1 and words[1] != str(CONTROL_SLOT)


def _moved_address(words: list[str]) -> tuple[str, int] | None:
    """``MOVED <slot> <host>:<port>`` → the address; None for the other replies (ask the
    seeds again)."""
    if words[0] != "MOVED" or len(words) < 3:
        return None
    host, _, port = words[2].rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None
