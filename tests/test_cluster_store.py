"""The store's pieces on a real Redis Cluster (three masters, a replica each;
``tests.support.cluster``): the layout of ``broker.keys`` and the connections of
``broker.cluster_connections``.

- Generations created through the cluster client land on every master, each whole in its
  slot, with their jobs, index and lease entries in the control slot; they are claimed,
  appended to and read like on one Redis, and a listing page gathers their meta hashes
  from every node.
- arq's connections (``control_slot_pool``) reach the master of the control slot, and the
  new one after ``CLUSTER FAILOVER`` moved it: a command answered ``MOVED`` fails as a
  connection error, the next goes to the new master.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import redis.exceptions as redis_errors
from arq.connections import ArqRedis
from redis.asyncio.cluster import RedisCluster

from broker import events, keys
from broker.cluster_connections import bounded_cluster_client, cluster_client, control_slot_pool
from broker.generation_log import GenerationLog
from broker.listing import list_streams
from broker.store_url import parse_store_url
from tests.support.cluster import RedisClusterSet, broker_client
from tests.support.generation_job import new_state
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

#: Enough that ids land on every one of 3 masters but once in about 10^8 runs (12 missed one
#: about once in 40: 3 * (2/3)^12).
GENERATIONS = 48


@pytest.fixture
async def client(replicated_cluster: RedisClusterSet) -> AsyncIterator[RedisCluster]:
    """The broker's client of the shared cluster (``tests/conftest.py``: whole and empty)."""
    async with broker_client(replicated_cluster) as store:
        yield store


async def test_generations_spread_over_the_masters_and_work_as_on_one_redis(
    replicated_cluster: RedisClusterSet, client: RedisCluster
) -> None:
    cluster = replicated_cluster
    log = GenerationLog(client, retention_seconds=600)
    assert log.on_cluster
    states = [new_state() for _ in range(GENERATIONS)]
    for state in states:
        await log.create(state)

    owners = {cluster.owner_of(keys.meta_key(state.id)) for state in states}
    assert len(owners) == 3, "ids spread over every master"
    control = cluster.owner_of(keys.QUEUE_NAME)
    for key in (keys.INDEX_KEY, keys.LEASES_KEY, "arq:job:" + keys.job_id(states[0].id)):
        assert cluster.owner_of(key) == control
    assert await client.zcard(keys.QUEUE_NAME) == GENERATIONS

    for state in states:
        claim = await log.claim(state.id, worker="w-test", lease_seconds=5)
        writer = log.writer(state.id, claim, lease_seconds=5)
        got = await log.get(state.id)
        await writer.append(events.metadata(got, attempt=claim.attempt, t=1))
        await writer.append(events.done("stop", events.NO_USAGE, t=2))
        read = await log.read(state.id, 0)
        assert [event.type for event in read] == [events.EventType.METADATA, events.EventType.DONE]
        assert (await log.get(state.id)).status.value == "completed"

    page, _ = await list_streams(log, tenant=None, limit=GENERATIONS)
    assert sorted(state.id for state in page) == sorted(state.id for state in states)


async def test_arq_connections_follow_the_control_slot_through_a_failover(
    replicated_cluster: RedisClusterSet,
) -> None:
    cluster = replicated_cluster
    seeds = parse_store_url(cluster.url).cluster
    assert seeds is not None
    arq = ArqRedis(connection_pool=control_slot_pool(seeds, client_name="streambroker-t"))
    try:
        await arq.zadd(keys.QUEUE_NAME, {"{control}probe": 1})
        old = cluster.owner_of(keys.QUEUE_NAME)
        assert int((await arq.config_get("port"))["port"]) == old

        new = await anyio.to_thread.run_sync(cluster.failover, old)

        async def served_by_the_new_master() -> bool:
            try:
                score = await arq.zscore(keys.QUEUE_NAME, "{control}probe")
            except redis_errors.ConnectionError:
                return False  # MOVED: the connection is dropped, the next one goes there
            return score == 1 and int((await arq.config_get("port"))["port"]) == new

        await eventually_async(served_by_the_new_master, timeout=10, interval=0.05)
    finally:
        await arq.aclose(close_connection_pool=True)


@pytest.mark.parametrize(
    "torn_down",
    [
        AttributeError("'NoneType' object has no attribute 'writelines'"),
        RuntimeError(
            "unable to perform operation on <TCPTransport closed=True>; the handler is closed"
        ),
    ],
)
async def test_a_connection_closed_under_a_command_fails_as_a_lost_connection(
    monkeypatch: pytest.MonkeyPatch, torn_down: Exception
) -> None:
    """redis-py's cluster client closes every node's connections on any connection error,
    those in use too; what a command on one of them then meets must read as a blip."""
    from redis.asyncio.connection import Connection

    from broker.cluster_connections import ClusterNodeConnection

    async def fails(*args: object, **kwargs: object) -> None:
        raise torn_down

    monkeypatch.setattr(Connection, "send_packed_command", fails)
    monkeypatch.setattr(Connection, "read_response", fails)
    connection = ClusterNodeConnection(host="127.0.0.1", port=1)
    with pytest.raises(redis_errors.ConnectionError, match="closed under this command"):
        await connection.send_packed_command(b"PING")
    with pytest.raises(redis_errors.ConnectionError, match="closed under this command"):
        await connection.read_response()


async def test_another_attribute_error_is_not_taken_for_a_lost_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from redis.asyncio.connection import Connection

    from broker.cluster_connections import ClusterNodeConnection

    async def fails(*args: object, **kwargs: object) -> None:
        raise AttributeError("'Connection' object has no attribute 'typo'")

    monkeypatch.setattr(Connection, "send_packed_command", fails)
    with pytest.raises(AttributeError, match="typo"):
        await ClusterNodeConnection(host="127.0.0.1", port=1).send_packed_command(b"PING")


def test_the_seed_nodes_can_be_walked_while_a_failed_one_is_dropped() -> None:
    """redis-py walks the seeds across awaits to learn the slot map, while a command that
    lost its connection drops its node from them."""
    seeds = parse_store_url("redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003").cluster
    assert seeds is not None
    client = cluster_client(seeds, client_name="streambroker-t")
    nodes = client.nodes_manager.startup_nodes
    walked = []
    for node in nodes.values():
        walked.append(node.name)
        nodes.pop("127.0.0.1:7003", None)
    assert walked == ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
    assert list(nodes) == ["127.0.0.1:7001", "127.0.0.1:7002"]


async def test_a_view_reset_under_a_command_or_pipeline_fails_as_a_lost_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis-py resets its cluster view (no default node) while other commands still read
    it; what they then meet must read as a blip, not a bug (an api 500)."""
    from redis.asyncio.cluster import ClusterPipeline

    async def view_gone(*args: object, **kwargs: object) -> None:
        raise AttributeError("'NoneType' object has no attribute 'name'")

    monkeypatch.setattr(RedisCluster, "execute_command", view_gone)
    monkeypatch.setattr(ClusterPipeline, "execute", view_gone)
    seeds = parse_store_url("redis+cluster://127.0.0.1:7001").cluster
    assert seeds is not None
    for client in (
        cluster_client(seeds, client_name="streambroker-t"),
        bounded_cluster_client(seeds, client_name="t", max_connections=2, wait_seconds=1),
    ):
        with pytest.raises(redis_errors.ConnectionError, match="view was reset"):
            await client.get("k")
        pipe = client.pipeline()
        pipe.get("k")
        with pytest.raises(redis_errors.ConnectionError, match="view was reset"):
            await pipe.execute()
