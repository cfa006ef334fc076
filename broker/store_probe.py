"""Whether a process's Redis can take its writes now: the probe behind every ``/readyz``.

Ready means more than "Redis answers": a replica answers too, and refuses every write, so a
process pointed at one (a ``redis://`` URL naming a node that a failover demoted) must not
count as ready. ``ROLE`` on the client's own connection says which it is; behind Sentinel
that connection is aimed at the Sentinels' master, so the probe fails until there is one.
On a Redis Cluster every master is asked: a generation may live on any of them. And a master
may refuse writes too (``NOREPLICAS``: cut off from its replicas, with
``min-replicas-to-write``), so a short-lived key is written as well.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from broker import keys
from broker.log_errors import is_no_replicas, reply_text
from broker.store_connections import StoreClient

#: Longest a probe waits for Redis before it reports it as not answering.
READY_TIMEOUT_SECONDS = 1.0


async def store_problem(stores: Sequence[StoreClient]) -> str | None:
    """Why the process's Redis cannot take its writes now; None when it can: every client's
    node answers, within ``READY_TIMEOUT_SECONDS``, as a master, and the first client's
    node takes a short-lived write (a master cut off from its replicas refuses it:
    ``NOREPLICAS``)."""
    if not stores:
        return "no Redis client yet"
    try:
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            for redis in stores:
                role = await replication_role(redis)
                if role != "master":
                    return (
                        f"Redis answers as a {role}, which takes no writes: REDIS_URL names a "
                        "replica (use the master, or redis+sentinel://), or a failover is "
                        "under way"
                    )
            await stores[0].set(keys.READY_PROBE_KEY, "1", px=keys.READY_PROBE_MS)
    except redis_errors.ResponseError as exc:
        if is_no_replicas(exc):
            return (
                "the Redis master refuses writes: fewer replicas in sync than its "
                "min-replicas-to-write asks for"
            )
        return f"Redis refused: {reply_text(exc)}"
    except (TimeoutError, redis_errors.RedisError, OSError) as exc:
        return f"Redis does not answer: {reply_text(exc) or type(exc).__name__}"
    return None


async def replication_role(redis: StoreClient) -> str:
    """``master``, ``replica`` or ``sentinel``, as ``ROLE`` says (every master of a Redis
    Cluster: ``master`` if all say so); a store without ``ROLE`` (fakeredis) is a master."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()
        replies = await redis.execute_command("ROLE", target_nodes=RedisCluster.PRIMARIES)
        if not isinstance(replies, dict):
            replies = {"": replies}  # one master: redis-py hands back its reply alone
        for reply in replies.values():
            if (role := _role(reply)) != "master":
                await redis.nodes_manager.initialize()  # learn the new map for next time
                return role
        return "master"
    try:
        reply = await redis.role()
    except redis_errors.ResponseError as exc:
        if "unknown command" in str(exc).lower():
            return "master"
        raise
    return _role(reply)


def _role(reply: Any) -> str:
    role = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    return "replica" if role == "slave" else role
