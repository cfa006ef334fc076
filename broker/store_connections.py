"""The broker's Redis connection pools, built from ``REDIS_URL`` (``broker.store_url``).

Every process gets its connections here, so a ``redis+sentinel://`` address works the same
for all of them: the api's bounded client (``api_client``), the reader hub's single
connection and a worker's pool (``pool``), arq's own command line (``arq_redis_settings``).
A ``redis+cluster://`` address has connections of its own kind (``broker.cluster_connections``):
the api's client comes from here all the same.

With Sentinel, connections go to the node the Sentinels name as master, and move:

- when a connection is made (also after one was lost: the master died), the Sentinels are
  asked again (redis-py's ``SentinelManagedConnection``, asking as ``Sentinels`` does);
- when a master refuses a write because it is one no longer: ``READONLY`` (a demoted master,
  redis-py) or ``NOREPLICAS`` (one cut off from its replicas, with the ``min-replicas-*``
  settings of ``infra/sentinel/``). Either drops the connection and fails the command as a
  ``ConnectionError``, which every caller already rides out as a blip of the store; the
  next connection is made to whichever node the Sentinels name then;
- at most every ``MASTER_CHECK_SECONDS``, a connection handed out of a pool is checked against
  the Sentinels' answer, and re-made if the master moved. Without this, connections still
  open to a master that ``SENTINEL FAILOVER`` (or a partition) replaced would keep reading
  its stale data until Sentinel reconfigures it, ten seconds or more later.

Nothing here ever connects to a replica: a pool is only ever aimed at the master.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, TypeAlias

import redis.asyncio as aioredis
from arq.connections import RedisSettings
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, ConnectionPool
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
)

from broker.cluster_connections import bounded_cluster_client
from broker.errors import ConfigError
from broker.log_errors import is_no_replicas
from broker.store_url import SentinelService, StoreAddress

#: How long making a connection to a data node may take (arq's own default); a node that
#: does not answer by then is treated as down (with Sentinel, the next try asks the
#: Sentinels again). Short, because a master whose machine died answers nothing at all.
CONNECT_TIMEOUT_SECONDS = 1.0
#: Timeout of each question to a Sentinel (connect, and answer): a dead one is skipped.
SENTINEL_TIMEOUT_SECONDS = 1.0
#: How often, at most, a pool checks that its connections are still aimed at the master.
MASTER_CHECK_SECONDS = 1.0


#: A client of the store: one Redis (or the Sentinels' master), or a Redis Cluster.
StoreClient: TypeAlias = aioredis.Redis | RedisCluster


def api_client(
    address: StoreAddress, *, max_connections: int, wait_seconds: int, client_name: str
) -> StoreClient:
    """The api's client, bounded whatever the number of clients: at most
    ``max_connections`` in use (on a cluster, to each node); a command waits up to
    ``wait_seconds`` for one, then fails with ``ConnectionError``. Closing it closes its
    connections."""
    if address.cluster is not None:
        return bounded_cluster_client(
            address.cluster,
            client_name=client_name,
            max_connections=max_connections,
            wait_seconds=wait_seconds,
        )
    return aioredis.Redis.from_pool(
        bounded_pool(
            address,
            max_connections=max_connections,
            wait_seconds=wait_seconds,
            client_name=client_name,
        )
    )


def bounded_pool(
    address: StoreAddress, *, max_connections: int, wait_seconds: int, client_name: str
) -> ConnectionPool:
    """At most ``max_connections``; a command waits up to ``wait_seconds`` for one of them
    to be free, then fails with ``ConnectionError`` (one Redis, or behind Sentinel)."""
    if address.sentinel is None:
        return BlockingConnectionPool.from_url(
            address.url,
            max_connections=max_connections,
            timeout=wait_seconds,
            client_name=client_name,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        )
    return BlockingSentinelMasterPool(
        address.sentinel.service,
        _sentinels(address.sentinel),
        max_connections=max_connections,
        timeout=wait_seconds,
        **_node_options(address.sentinel, client_name),
    )


def pool(
    address: StoreAddress,
    *,
    client_name: str,
    max_connections: int | None = None,
    command_timeout: float | None = None,
) -> ConnectionPool:
    """A pool that fails at once when ``max_connections`` are in use (the hub reads through
    one connection only; a worker's is unbounded). One Redis, or behind Sentinel: on a
    cluster, ``broker.cluster_connections`` has the pools.

    ``command_timeout``: longest a command waits for its reply. The workers' pool has one: a
    Redis that accepts connections and never answers (stopped, a network that drops
    packets) would otherwise hold a job, or a worker's shutdown, for good. The hub's has
    none: its blocking read waits on purpose."""
    if address.sentinel is None:
        return ConnectionPool.from_url(
            address.url,
            max_connections=max_connections,
            client_name=client_name,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_timeout=command_timeout,
        )
    return SentinelMasterPool(
        address.sentinel.service,
        _sentinels(address.sentinel),
        max_connections=max_connections,
        socket_timeout=command_timeout,
        **_node_options(address.sentinel, client_name),
    )


def arq_redis_settings(address: StoreAddress) -> RedisSettings:
    """The same address for arq's own command line (``arq workers.worker.WorkerSettings``),
    which builds its connections itself. Its Sentinel pool re-aims on ``READONLY`` and lost
    connections, not on ``NOREPLICAS``: ``streambroker worker`` is the one to run. It cannot
    reach a Redis Cluster at all (arq's pool is for one node)."""
    if address.cluster is not None:
        raise ConfigError(
            f"REDIS_URL names {address.describe()}: arq's own command line cannot reach a "
            "Redis Cluster; run `streambroker worker`"
        )
    if address.sentinel is None:
        return RedisSettings.from_dsn(address.url)
    service = address.sentinel
    return RedisSettings(
        host=list(service.sentinels),
        sentinel=True,
        sentinel_master=service.service,
        database=service.db,
        username=service.username,
        password=service.password,
    )


def _sentinels(service: SentinelService) -> Sentinels:
    """A pool's own client of the Sentinels (closed with the pool)."""
    timeouts = {
        "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS,
        "socket_timeout": SENTINEL_TIMEOUT_SECONDS,
    }
    return Sentinels(list(service.sentinels), sentinel_kwargs=timeouts)


def _node_options(service: SentinelService, client_name: str) -> dict[str, Any]:
    """What every connection to a data node of ``service`` is made with."""
    return {
        "db": service.db,
        "username": service.username,
        "password": service.password,
        "client_name": client_name,
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "connection_class": SentinelMasterConnection,
    }


class Sentinels(Sentinel):
    """redis-py's Sentinel client, asking for the master as Sentinel's client guidelines say.

    redis-py reads ``SENTINEL MASTERS``, which names the new master only once a failover has
    ended (every replica moved to it); ``SENTINEL GET-MASTER-ADDR-BY-NAME`` names it as soon
    as it is promoted, a second or so earlier, while the old one already refuses writes.

    Whatever a Sentinel answers, the node itself has the last word: a replica refuses writes
    (``READONLY``), a master cut off from its replicas too (``NOREPLICAS``), and the
    connection asks again (``SentinelMasterConnection``). The Sentinel that named that node
    is then asked last (``distrust``): one on the minority side of a partition, or one that
    has not yet heard of a failover, keeps naming the old master, and asking it first again
    would keep every connection on a node that refuses them while the others name a good
    one. A Sentinel that does not answer is asked last too, and one that answers first.
    """

    def __init__(self, sentinels: list[tuple[str, int]], **kwargs: Any) -> None:
        super().__init__(sentinels, **kwargs)  # type: ignore[no-untyped-call]
        #: Which Sentinel named each master address last.
        self._named_by: dict[tuple[str, int], Any] = {}

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        errors = []
        # A copy: concurrent discoveries reorder the list while this one awaits answers.
        for sentinel in list(self.sentinels):
            try:
                address = await sentinel.sentinel_get_master_addr_by_name(  # type: ignore[no-untyped-call]
                    service_name
                )
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                errors.append(f"{_sentinel_text(sentinel)}: {exc}")
                self._ask_last(sentinel)
                continue
            if address:
                self._ask_first(sentinel)
                host, port = address
                master = (host.decode() if isinstance(host, bytes) else str(host)), int(port)
                self._named_by[master] = sentinel
                return master
            errors.append(f"{_sentinel_text(sentinel)}: no master named {service_name!r}")
        raise MasterNotFoundError(f"no master found for {service_name!r}: {'; '.join(errors)}")

    def distrust(self, master: tuple[str, int]) -> None:
        """The node at ``master`` refused writes as a master does not: ask the Sentinel that
        named it after all the others next time."""
        sentinel = self._named_by.pop(master, None)
        if sentinel is not None:
            self._ask_last(sentinel)

    def _ask_first(self, sentinel: Any) -> None:
        self._move(sentinel, 0)

    def _ask_last(self, sentinel: Any) -> None:
        self._move(sentinel, len(self.sentinels))

    def _move(self, sentinel: Any, position: int) -> None:
        # By identity: the list holds clients, which do not compare by value.
        for index, candidate in enumerate(self.sentinels):
            if candidate is sentinel:
                del self.sentinels[index]
                self.sentinels.insert(min(position, len(self.sentinels)), sentinel)
                return


def _sentinel_text(sentinel: Any) -> str:
    options = sentinel.connection_pool.connection_kwargs
    return f"sentinel {options.get('host')}:{options.get('port')}"


class SentinelMasterConnection(SentinelManagedConnection):
    """A connection to the Sentinels' master that lets go of a master that has lost its
    replicas, as redis-py's own lets go of one that was demoted.

    ``NOREPLICAS`` is what a master with ``min-replicas-to-write`` answers once it is cut off
    from its replicas: typically the old master after a failover, on the wrong side of a
    partition, or before Sentinel has reconfigured it. Dropping the connection makes the
    next one ask the Sentinels where the master is now.
    """

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        refused_at = (self.host, self.port)
        try:
            return await super().read_response(*args, **kwargs)
        except redis_errors.ConnectionError as exc:
            # redis-py's own answer to READONLY: the node is a replica now.
            if isinstance(exc.__context__, redis_errors.ReadOnlyError):
                self.connection_pool.sentinel_manager.distrust(refused_at)
            raise
        except redis_errors.ResponseError as exc:
            if not is_no_replicas(exc):
                raise
            self.connection_pool.sentinel_manager.distrust(refused_at)
            await self.disconnect()
            raise redis_errors.ConnectionError(
                f"the master refuses writes ({exc}); asking the sentinels again"
            ) from exc


class SentinelMasterPool(SentinelConnectionPool):
    """redis-py's Sentinel pool, aimed at the master only, that follows a master which moved
    while its connections stayed open, and closes its Sentinel client with itself."""

    def __init__(self, service_name: str, sentinel_manager: Sentinels, **kwargs: Any) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            service_name, sentinel_manager, is_master=True, **kwargs
        )
        self._next_master_check = 0.0
        #: The master as the Sentinels named it last (None: not asked yet).
        self._master: tuple[str, int] | None = None

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        await self._follow_the_master(connection)
        await super().ensure_connection(connection)

    async def _follow_the_master(self, connection: AbstractConnection) -> None:
        """Drop ``connection`` if it is open to another node than the master the Sentinels
        named last (it is made again, to the master, before it is used). The Sentinels are
        asked at most every ``MASTER_CHECK_SECONDS``; every connection handed out is compared
        with their last answer, so one that was in use when the master moved is caught the
        next time it is handed out, not a check later."""
        now = time.monotonic()
        if now >= self._next_master_check:
            self._next_master_check = now + MASTER_CHECK_SECONDS
            # No Sentinel answers, or none names a master: the command will tell.
            with contextlib.suppress(redis_errors.RedisError, OSError):
                # Also drops the idle connections, when the master changed.
                self._master = await self.get_master_address()  # type: ignore[no-untyped-call]
        if not connection.is_connected or self._master is None:
            return
        if (getattr(connection, "host", None), getattr(connection, "port", None)) != self._master:
            await connection.disconnect()

    async def disconnect(self, inuse_connections: bool = True) -> None:
        """``inuse_connections``: all of them, as when the pool is closed; then the Sentinel
        client's too. Otherwise the idle ones (a new master was found)."""
        await super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.connection_pool.disconnect()


class BlockingSentinelMasterPool(SentinelMasterPool, BlockingConnectionPool):
    """``SentinelMasterPool`` with ``BlockingConnectionPool``'s cap: at most
    ``max_connections``, a command waits up to ``timeout`` seconds for a free one."""
