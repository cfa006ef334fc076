"""Defects found in a second review of the Redis Cluster support: each test fails while its
defect is there. Real Redis Cluster processes (``tests.support.cluster``), on the cluster
with replicas that consecutive tests share (``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from redis.asyncio.connection import Connection

from broker import keys, scripts
from broker.archive import import_lines
from broker.generation_log import GenerationLog
from broker.listing import list_streams
from broker.state import Status
from broker.store_scripts import StoreScript
from tests.support import archives
from tests.support.cluster import RedisClusterSet, broker_client
from tests.support.generation_job import new_state
from tests.support.processes import Launcher
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def off_the_control_slot(cluster: RedisClusterSet) -> tuple[Any, int]:
    """A new generation whose slot another master than the control slot's serves (arq's
    own shard stays up: only the generation's fails), and that master's port."""
    control = cluster.owner_of(keys.QUEUE_NAME)
    for _ in range(200):
        state = new_state()
        port = cluster.owner_of(keys.meta_key(state.id))
        if port != control:
            return state, port
    raise AssertionError("no id off the control slot in 200 tries")


# -- 1. a failover of a generation's shard at pickup leaves it queued for the queue timeout --


async def test_a_generation_picked_up_during_its_shards_failover_is_not_dropped_queued(
    replicated_cluster: RedisClusterSet,
) -> None:
    """A generation's master is killed (kill -9) just as a worker picks its job up; its
    replica is promoted within about cluster-node-timeout (2 s) plus an election.

    The claim fails meanwhile (StoreUnavailable) and the job raises ``Retry(defer=1 s)``
    (workers/generate.py ``_claim_once``), and each Retry is one of arq's tries: with
    ``max_tries=3`` (workers/worker.py ``worker_options``) the 4th run, about 3 s after the
    first, is refused as "max retries 3 exceeded" before it claims anything. arq deletes
    the job and its queue entry; the generation's record still says ``queued``, and nothing
    runs it again: it stays queued until ``BROKER_QUEUE_TIMEOUT_SECONDS`` (24 h) when the
    sweeper ends it as ``queue_timeout``. A failover of the store must be a blip."""
    cluster = replicated_cluster
    async with broker_client(cluster) as client:
        log = GenerationLog(client, retention_seconds=600)
        state, port = off_the_control_slot(cluster)
        await log.create(state)
        job_id = keys.job_id(state.id)

        async with anyio.create_task_group() as group:
            group.start_soon(anyio.to_thread.run_sync, cluster.kill_master, port)
            await eventually_async(lambda: not cluster.nodes[port].running, timeout=10)
            # A worker process of its own (as deployed): it starts while the shard is down.
            with Launcher(cluster.url) as launch:
                await anyio.to_thread.run_sync(launch.worker, {"BROKER_JOB_POLL_SECONDS": "0.05"})

                async def left_queued() -> bool:
                    try:
                        return (await log.get(state.id)).status != Status.QUEUED
                    except Exception:
                        return False  # the shard is failing over

                try:
                    await eventually_async(left_queued, timeout=15, interval=0.1)
                except AssertionError:
                    queued = await client.zscore(keys.QUEUE_NAME, job_id)
                    result = await client.exists("arq:result:" + job_id)
                    raise AssertionError(
                        f"generation still queued 15 s after the failover; its job is "
                        f"{'still queued' if queued is not None else 'gone from the queue'}"
                        f"{' with a result recorded (max retries exceeded)' if result else ''}"
                    ) from None


# -- 2. an import whose commit reply was lost is re-run by the client and reported as taken --


async def test_an_import_whose_commit_reply_was_lost_is_not_reported_as_a_clash_with_itself(
    replicated_cluster: RedisClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ClusterNodeConnection`` turns a reader torn down under a command (the cluster
    client's reset on another node's connection error, ce7e60e) into ``ConnectionError``;
    redis-py's cluster client re-sends a command that failed so, and a plain timeout too,
    although the node may have run it. ``COMMIT_IMPORT`` is not idempotent: its second run
    finds the stream it put in place and answers ``EXISTS``. The importer is told
    ``AlreadyExists`` (409), nothing imported, while the stream is in place and listed;
    with auth on, under a new id the importer never learns, so its retry imports it twice.
    Here the lost reply is injected where the race puts it: after the script ran."""
    async with broker_client(replicated_cluster) as client:
        log = GenerationLog(client, retention_seconds=600)
        text = archives.dumps(archives.build())

        async def lines() -> AsyncIterator[str]:
            for line in text.splitlines():
                yield line

        armed: list[bool] = []
        real_read = Connection.read_response
        real_call = StoreScript.__call__

        async def read_response(self: Connection, *args: Any, **kwargs: Any) -> Any:
            reply = await real_read(self, *args, **kwargs)
            if armed:
                armed.clear()
                raise AttributeError("'NoneType' object has no attribute 'read'")
            return reply

        async def call(self: StoreScript, *, keys: Any, args: Any = ()) -> Any:
            if self.text == scripts.COMMIT_IMPORT:
                armed.append(True)  # the reply of the commit's script is lost
            return await real_call(self, keys=keys, args=args)

        monkeypatch.setattr(Connection, "read_response", read_response)
        monkeypatch.setattr(StoreScript, "__call__", call)
        outcome: str | Exception
        try:
            outcome = await import_lines(log, lines(), tenant="t1")
        except Exception as exc:
            outcome = exc
        monkeypatch.undo()

        page, _ = await list_streams(log, tenant="t1", limit=10)
        listed = [state.id for state in page]
        assert len(listed) == 1, "the import landed"
        assert outcome == listed[0], (
            f"the importer was told {outcome!r} while its stream {listed[0]} is in place"
        )


# -- 3. a create slowed by its shard's failover answers 201 for a generation whose job is gone --


async def test_a_create_that_succeeds_during_its_shards_failover_leaves_a_job_to_run_it(
    replicated_cluster: RedisClusterSet,
) -> None:
    """On a cluster ``GenerationLog.create`` queues the job first and writes the record
    second; a worker that takes the job before the record is there looks for it for
    ``RECORD_PENDING_MS`` (3 s), then drops the job. The record's write goes to the
    generation's master: when that master hangs (SIGSTOP: a frozen host), the write waits
    out the 5 s command timeout, redis-py learns the new map and writes it to the promoted
    replica, and the create succeeds (the api answers 201) after the job was dropped (or
    burnt its tries on claims that timed out). The generation stays ``queued``, no job
    names it, until the queue timeout (24 h)."""
    cluster = replicated_cluster
    async with broker_client(cluster) as client:
        log = GenerationLog(client, retention_seconds=600)
        state, port = off_the_control_slot(cluster)
        job_id = keys.job_id(state.id)
        with Launcher(cluster.url) as launch:
            await anyio.to_thread.run_sync(launch.worker, {"BROKER_JOB_POLL_SECONDS": "0.05"})
            await client.ping(target_nodes=client.PRIMARIES)
            with cluster.frozen(port):
                await log.create(state)  # succeeds, after the failover

            async def started_or_still_queued() -> bool:
                if (await log.get(state.id)).status != Status.QUEUED:
                    return True
                return await client.zscore(keys.QUEUE_NAME, job_id) is not None

            assert await started_or_still_queued(), (
                "the create succeeded, but its generation is queued and its job is gone"
            )
