"""A Redis master and its replica as real redis-server processes, and a failover between them.

Replication is asynchronous: the master acknowledges a write before any replica has it. A
failover that promotes a replica lagging behind therefore loses what the master acknowledged
last, on a new timeline (a new replication id). ``promote`` is that failover, done at the
moment a test chooses: everything written to the master before it and confirmed with
``wait_for_replica`` is on the replica; anything written to the master after it is lost to
the replica's timeline, exactly as if the replica had lagged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
import redis.asyncio as aioredis

from tests.support.redis_server import RedisServer, running_server
from tests.support.waiting import eventually


@contextmanager
def master_and_replica() -> Iterator[tuple[RedisServer, RedisServer]]:
    """Two private redis-servers, the second a read-only replica of the first, in sync."""
    with running_server() as master, running_server() as replica:
        follow(replica, master)
        yield master, replica


def follow(replica: RedisServer, master: RedisServer) -> None:
    """Make ``replica`` replicate ``master`` and wait until it has synced."""
    with redis.Redis(port=master.port) as source, redis.Redis(port=replica.port) as client:
        # The full sync otherwise waits 5 s for more replicas to share its transfer.
        source.config_set("repl-diskless-sync-delay", 0)
        client.config_set("replica-read-only", "yes")
        client.replicaof("127.0.0.1", master.port)

        def synced() -> bool:
            info = client.info("replication")
            # The master counts the replica (for WAIT) once it is online: after its first
            # acknowledgement, up to a second after the sync.
            replica_seen = source.info("replication").get("slave0", {})
            return bool(
                info.get("master_link_status") == "up"
                and not info.get("master_sync_in_progress")
                and replica_seen.get("state") == "online"
            )

        eventually(synced, timeout=10, what=f"redis on {replica.port} to sync with {master.port}")


async def wait_for_replica(master: aioredis.Redis, timeout_ms: int = 5000) -> None:
    """Until the replica acknowledged everything written to ``master`` so far (by any
    client: ``WAIT`` counts this connection's writes, so a write of its own comes last)."""
    await master.set("sb:test:replicated", "1")
    acknowledged = await master.wait(1, timeout_ms)
    assert acknowledged >= 1, "the replica did not acknowledge the writes"


def promote(replica: RedisServer) -> None:
    """The failover: the replica stops following and becomes a master (new replication id)."""
    with redis.Redis(port=replica.port) as client:
        client.replicaof("NO", "ONE")


def replication_id(server: RedisServer) -> str:
    """The server's ``master_replid``: the store epoch the broker records."""
    with redis.Redis(port=server.port) as client:
        replid: str = client.info("replication")["master_replid"]
        return replid
