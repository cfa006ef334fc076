"""The store epoch raises no false alarm (``tests/test_store_epoch.py`` is the loss it
reports): without a failover a sweep still ends a generation with ``worker_lost``; a writer
that carries on after a failover without losing anything keeps going, and is swept as
``worker_lost`` if it dies then; a store without epochs (fakeredis) sweeps as before; and the
epoch, which describes a store and not a stream, stays out of exports and imports.

Real redis-server processes, a master and its replica (``tests.support.replication``), where a
failover is needed; sweeps take the clock as an argument: a lapsed lease is a ``now`` past it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import fakeredis.aioredis
import pytest
import redis.asyncio as aioredis

from broker import keys
from broker.archive import export_lines, import_lines
from broker.generation_log import GenerationLog, LogWriter
from broker.keys import MetaField
from broker.state import Status, now_ms
from broker.sweeper import LeaseSweeper
from tests.support.replication import (
    LATER,
    LEASE,
    Failover,
    done,
    promote,
    replication_id,
    running,
    token,
    wait_for_replica,
)

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def test_without_a_failover_a_sweep_still_ends_with_worker_lost(pair: Failover) -> None:
    stream_id, _ = await running(pair.log_a, "a", "b")
    meta = await pair.log_a.redis.hgetall(keys.meta_key(stream_id))
    assert meta[MetaField.EPOCH.encode()].decode() == replication_id(pair.a)

    sweeper = LeaseSweeper(pair.log_a, owner="sweeper-a", lease_seconds=LEASE)
    assert await sweeper.sweep_once(now=now_ms() + LATER) == [stream_id]

    state = await pair.log_a.get(stream_id)
    assert state.error is not None
    assert state.error["code"] == "worker_lost"
    assert state.lost_from_seq is None


async def test_a_writer_that_carries_on_after_a_failover_keeps_going(pair: Failover) -> None:
    """Nothing was lost: its next append passes the sequence check on the new master, which
    proves the log is the one it wrote, and moves the generation to the new timeline."""
    stream_id, old = await running(pair.log_a, "a", "b")
    await wait_for_replica(pair.log_a.redis)
    promote(pair.b)
    writer = LogWriter(pair.log_b, stream_id, old.attempt, old.next_seq, LEASE)  # re-pointed

    await writer.append(token("c"))
    meta = await pair.log_b.redis.hgetall(keys.meta_key(stream_id))
    assert meta[MetaField.EPOCH.encode()].decode() == replication_id(pair.b)
    # A job run again meanwhile (its in-progress key was lost) is not refused for a loss now.
    await writer.append(token("d"), done())

    state = await pair.log_b.get(stream_id)
    assert (state.status, state.text, state.lost_from_seq) == (Status.COMPLETED, "abcd", None)


async def test_a_writer_that_dies_after_carrying_on_is_swept_as_worker_lost(
    pair: Failover,
) -> None:
    stream_id, old = await running(pair.log_a, "a")
    await wait_for_replica(pair.log_a.redis)
    promote(pair.b)
    await LogWriter(pair.log_b, stream_id, old.attempt, old.next_seq, LEASE).append(token("b"))

    assert await pair.sweeper_on_b().sweep_once(now=now_ms() + LATER) == [stream_id]
    state = await pair.log_b.get(stream_id)
    assert state.error is not None
    assert (state.error["code"], state.lost_from_seq) == ("worker_lost", None)


async def test_a_store_without_epochs_sweeps_as_before() -> None:
    """fakeredis has no ``INFO`` (``streambroker dev --store fakeredis``): no epoch, and
    every check that needs one is off."""
    redis = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    log = GenerationLog(redis, retention_seconds=600)
    stream_id, _ = await running(log, "a")
    assert MetaField.EPOCH.encode() not in await redis.hgetall(keys.meta_key(stream_id))

    sweeper = LeaseSweeper(log, owner="s", lease_seconds=LEASE)
    assert await sweeper.sweep_once(now=now_ms() + LATER) == [stream_id]
    state = await log.get(stream_id)
    assert state.error is not None
    assert (state.error["code"], state.lost_from_seq) == ("worker_lost", None)
    await redis.aclose()


async def test_the_epoch_stays_out_of_exports_and_imports(redis: aioredis.Redis) -> None:
    """It describes a store, not the stream: another store's epoch means nothing here."""
    log = GenerationLog(redis, retention_seconds=600)
    stream_id, writer = await running(log, "a")
    await writer.append(done())
    assert await redis.hexists(keys.meta_key(stream_id), MetaField.EPOCH)

    lines = [line async for line in export_lines(log, stream_id)]
    assert '"epoch"' not in lines[0]

    planted = lines[0].replace('"meta":{', '"meta":{"epoch":"0123abcd",', 1)

    async def rows() -> AsyncIterator[str]:
        for line in [planted, *lines[1:]]:
            yield line.removesuffix("\n")

    imported = await import_lines(log, rows(), tenant="t")
    assert not await redis.hexists(keys.meta_key(imported), MetaField.EPOCH)
