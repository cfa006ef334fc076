"""Regressions found reviewing the Redis Cluster support: each test fails while its defect
is there. Real processes (``tests.support.cluster``, ``tests.support.processes``), on the
cluster with replicas that consecutive tests share (``tests/conftest.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from broker import keys
from tests.support.cluster import RedisClusterSet
from tests.support.generations import create
from tests.support.processes import Launcher
from tests.support.sse import watch
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.e2e]

ENV = {"BROKER_HEARTBEAT_SECONDS": "0.5"}


@contextmanager
def stopped_master(cluster: RedisClusterSet, port: int) -> Iterator[int]:
    """SIGSTOP a master (a hung machine, a partition that resets nothing: its sockets stay
    open and silent) until its replica is elected; yields the promoted port. SIGCONT on exit."""
    slots = cluster.slots_of(port)
    replicas = set(cluster.replicas_of(port))
    with cluster.frozen(port):
        yield cluster.wait_replaced(slots, replicas)


async def create_on(
    client: httpx.AsyncClient,
    base: str,
    cluster: RedisClusterSet,
    *,
    wanted: set[int] | None = None,
    unwanted: set[int] = frozenset(),  # type: ignore[assignment]
    **request: object,
) -> tuple[str, int]:
    """A generation whose shard is one of ``wanted`` (or not one of ``unwanted``): its id and
    the port of its master."""
    for _ in range(200):
        stream_id = await create(client, base, **request)  # type: ignore[arg-type]
        port = cluster.owner_of(keys.meta_key(stream_id))
        if (wanted is None or port in wanted) and port not in unwanted:
            return stream_id, port
    raise AssertionError("no generation landed on the wanted shard")


# -- 1. a master that hangs (SIGSTOP) wedges the reader hub for good ------------------------


async def test_a_hung_master_does_not_stop_the_hub_for_readers_of_healthy_shards(
    replicated_cluster: RedisClusterSet,
) -> None:
    """A master stops answering without closing its sockets (SIGSTOP: a hung host, a
    partition that resets nothing); its replica is elected within seconds. Readers of
    generations on the other, healthy shards must go on being served by the api's reader
    hub: here (no worker: both generations stay queued) its heartbeat, every 0.5 s.

    Now the hub's periodic check stops for good: the cluster client has no socket timeout
    (``broker/cluster_connections.py`` ``_cluster_options``), so the check's pipeline of
    ``HMGET`` (``api/hub.py`` ``_check_logs``), which includes the hung shard's watched
    generation, waits for as long as the node stays hung, failover or not. With it go the
    heartbeats of every client, the ``gone``/``lost`` endings and the re-reads of missed
    pulses. (In some runs the pulse-driven reads wedge as well, on the same hung socket:
    readers of healthy shards then receive no events at all.)
    """
    cluster = replicated_cluster
    control = cluster.owner_of("sb:{control}:queue")
    pings: list[float] = []

    async def read_pings(client: httpx.AsyncClient, base: str, stream_id: str) -> None:
        async with client.stream("GET", f"{base}/v1/streams/{stream_id}/events") as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith(": ping"):
                    pings.append(asyncio.get_running_loop().time())

    with Launcher(cluster.url) as launch:
        api = launch.api(ENV)  # no worker: the generations stay queued, readers get pings
        async with httpx.AsyncClient(timeout=60) as client:
            hung_id, hung = await create_on(client, api.url, cluster, unwanted={control})
            healthy_id, _ = await create_on(client, api.url, cluster, unwanted={hung})
            readers = [
                asyncio.create_task(watch(client, api.url, hung_id)),
                asyncio.create_task(read_pings(client, api.url, healthy_id)),
            ]
            try:
                await eventually_async(lambda: len(pings) >= 2, what="the first heartbeats")
                with stopped_master(cluster, hung):
                    after_failover = len(pings)
                    # Heartbeat 0.5 s: three more take ~1.5 s; 10 s is plenty.
                    await eventually_async(
                        lambda: len(pings) >= after_failover + 3,
                        timeout=10,
                        what=lambda: (
                            f"heartbeats to the reader of {healthy_id} (a healthy shard) "
                            f"after {hung}'s failover: {len(pings) - after_failover} arrived"
                        ),
                    )
            finally:
                for reader in readers:
                    reader.cancel()


# -- 2. the hub keeps its subscriptions (and node connections) once nobody watches -------


def shard_subscribers(cluster: RedisClusterSet, stream_id: str) -> int:
    """Subscribers of the generation's pulse channel, on the node that owns it."""
    import redis

    channel = keys.pulse_channel(stream_id)
    with redis.Redis(port=cluster.owner_of(channel)) as node:
        reply = node.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


def hub_connections(cluster: RedisClusterSet) -> int:
    """Connections reader hubs hold, to any node: masters and replicas alike."""
    import redis

    from api.hub import HUB_CLIENT_NAME

    total = 0
    for port in cluster.live_ports():
        with redis.Redis(port=port) as node:
            total += sum(1 for c in node.client_list() if c.get("name") == HUB_CLIENT_NAME)
    return total


async def test_the_hub_drops_its_subscriptions_once_no_client_watches(
    replicated_cluster: RedisClusterSet,
) -> None:
    """When the last reader of the last watched generation leaves, the hub must unsubscribe
    its pulse channel (and close its node connections) within a few checks, as it does
    while other generations are watched.

    Now it never does: the unsubscribing is done by ``ClusterTail.reconcile``, which only
    ``ReaderHub._check_logs`` calls, and that returns early when nothing is watched
    (``api/hub.py``: ``if not watched: return``). An idle api keeps an ``SSUBSCRIBE`` per
    generation last watched, and a Pub/Sub connection per node, until someone watches again.
    """
    cluster = replicated_cluster
    with Launcher(cluster.url) as launch:
        api = launch.api(ENV)
        launch.worker(ENV)
        async with httpx.AsyncClient(timeout=30) as client:
            stream_id = await create(client, api.url, max_tokens=60, rate=40)
            # Hang up mid-stream: the reader is subscribed through the hub by then.
            cut = await watch(client, api.url, stream_id, stop_after=5)
            assert len(cut.events) == 5
            assert shard_subscribers(cluster, stream_id) == 1
        # Nobody watches any more. Heartbeat 0.5 s, checks every 0.5 s: well within 10 s.
        await eventually_async(
            lambda: shard_subscribers(cluster, stream_id) == 0 and hub_connections(cluster) == 0,
            timeout=10,
            what=lambda: (
                f"the hub to unsubscribe {stream_id}: {shard_subscribers(cluster, stream_id)} "
                f"subscriber(s), {hub_connections(cluster)} hub connection(s)"
            ),
        )
