"""Appends that wait for replicas (``WAIT``, ``broker.replica_wait``), so that a failover
loses less (``tests/test_store_epoch.py`` is what it may still lose): off by default; when on,
a batch is on the replica when its append returns; without a replica answering (or on a store
without ``WAIT``) each append waits its timeout at most, the generation goes on, and each
shortfall is counted (``streambroker_append_replica_shortfalls_total``).

Real redis-server processes: a master and its replica (``tests.support.replication``), or the
session's lone redis-server, which no replica answers.
"""

from __future__ import annotations

import time

import fakeredis
import fakeredis.aioredis
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from broker import keys
from broker.errors import StaleWriter
from broker.generation_log import GenerationLog
from broker.replica_wait import ReplicaWait
from broker.settings import Settings
from broker.state import Status
from tests.support.replication import (
    LEASE,
    Failover,
    done,
    running,
    token,
)

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

SHORTFALLS = "streambroker_append_replica_shortfalls_total"


def shortfalls() -> float:
    return REGISTRY.get_sample_value(SHORTFALLS) or 0.0


async def test_appends_that_wait_for_a_replica_are_on_it_when_they_return(
    pair: Failover,
) -> None:
    log = GenerationLog(pair.log_a.redis, retention_seconds=600, replica_wait=ReplicaWait(1, 5000))
    before = shortfalls()
    stream_id, writer = await running(log)
    for text in "abcdef":
        stored = await writer.append(token(text))
        # Read on the replica at once: WAIT returned only once it had the batch.
        on_replica = await pair.log_b.redis.xrange(keys.log_key(stream_id), "-", "+")
        assert len(on_replica) == stored[-1].seq
    await writer.append(done())
    assert (await pair.log_b.get(stream_id)).status is Status.COMPLETED
    assert shortfalls() == before


async def test_appends_go_on_without_the_replicas_they_wait_for(redis: aioredis.Redis) -> None:
    """No replica answers: each append waits its timeout, then the generation goes on and
    completes; each shortfall is counted."""
    log = GenerationLog(redis, retention_seconds=600, replica_wait=ReplicaWait(1, 50))
    before = shortfalls()
    started = time.monotonic()
    _, writer = await running(log, "a", "b")  # two appends: metadata, then the tokens
    await writer.append(done())

    assert time.monotonic() - started >= 3 * 0.05
    assert (await log.get(writer.stream_id)).status is Status.COMPLETED
    assert shortfalls() == before + 3


async def test_a_store_without_wait_only_counts_a_shortfall() -> None:
    redis = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    log = GenerationLog(redis, retention_seconds=600, replica_wait=ReplicaWait(1, 50))
    before = shortfalls()
    _, writer = await running(log, "a")
    await writer.append(done())
    assert (await log.get(writer.stream_id)).status is Status.COMPLETED
    assert shortfalls() == before + 3
    await redis.aclose()


async def test_waiting_appends_load_a_script_the_store_forgot(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=600, replica_wait=ReplicaWait(1, 10))
    _, writer = await running(log, "a")
    await redis.script_flush()  # as a restarted Redis has no scripts
    await writer.append(token("b"), done())
    assert (await log.get(writer.stream_id)).text == "ab"


async def test_a_waiting_append_is_refused_like_any_other(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=600, replica_wait=ReplicaWait(1, 10))
    stream_id, writer = await running(log, "a")
    await log.claim(stream_id, worker="w2", lease_seconds=LEASE)  # fences the writer
    with pytest.raises(StaleWriter):
        await writer.append(token("b"))


async def test_waiting_is_a_setting_off_by_default() -> None:
    defaults = GenerationLog.from_settings(fakeredis.aioredis.FakeRedis(), Settings().generation)
    assert not defaults.replica_wait.enabled
    settings = Settings.from_env(
        {"BROKER_APPEND_WAIT_REPLICAS": "1", "BROKER_APPEND_WAIT_TIMEOUT_MS": "25"}
    )
    log = GenerationLog.from_settings(fakeredis.aioredis.FakeRedis(), settings.generation)
    assert log.replica_wait == ReplicaWait(replicas=1, timeout_ms=25)
    assert Settings().generation.append_wait_timeout_ms == ReplicaWait().timeout_ms
    assert log.retention_seconds == settings.generation.retention_seconds
