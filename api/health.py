"""Liveness and readiness: ``/healthz`` says the process answers, ``/readyz`` that the Redis
it writes to does, as a master.

Ready means more than "Redis answers": a replica answers too, and refuses every write, so an
api pointed at one (a ``redis://`` URL naming a node that a failover demoted) must not get
traffic. ``ROLE`` on the pool's own connection says which it is; behind Sentinel that
connection is aimed at the Sentinels' master, so ``/readyz`` stays 503 until there is one.
On a Redis Cluster every master is asked: a generation may live on any of them.
And a master may refuse writes too (``NOREPLICAS``: cut off from its replicas, with
``min-replicas-to-write``), so a short-lived key is written as well.
"""

from __future__ import annotations

from typing import Any

import anyio
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.errors import error_response
from broker import keys, metrics
from broker.log_errors import is_no_replicas, reply_text
from broker.store_connections import StoreClient

READY_TIMEOUT_SECONDS = 1.0
_RETRY = {"Retry-After": "1"}


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    redis = request.app.state.services.redis
    try:
        with anyio.fail_after(READY_TIMEOUT_SECONDS):
            role = await replication_role(redis)
            if role == "master":
                await redis.set(keys.READY_PROBE_KEY, "1", px=keys.READY_PROBE_MS)
    except redis_errors.ResponseError as exc:
        if not is_no_replicas(exc):
            raise
        return error_response(
            503,
            "store_unavailable",
            "the Redis master refuses writes: fewer replicas in sync than its "
            "min-replicas-to-write asks for",
            _RETRY,
        )
    except (TimeoutError, redis_errors.RedisError, OSError) as exc:
        return error_response(
            503, "store_unavailable", f"Redis does not answer: {reply_text(exc)}", _RETRY
        )
    if role != "master":
        return error_response(
            503,
            "store_unavailable",
            f"Redis answers as a {role}, which takes no writes: REDIS_URL names a replica "
            "(use the master, or redis+sentinel://), or a failover is under way",
            _RETRY,
        )
    return JSONResponse({"status": "ready"})


async def replication_role(redis: StoreClient) -> str:
    """``master``, ``replica`` (Redis says ``slave``) or ``sentinel``: what ``ROLE`` says
    the node behind ``redis`` is. A store without replication (fakeredis, which has no
    ``ROLE``) is its own master. On a Redis Cluster, every node the client takes for a
    master is asked: ``master`` if all say so."""
    if isinstance(redis, RedisCluster):
        return await _cluster_role(redis)
    try:
        reply = await redis.role()
    except redis_errors.ResponseError as exc:
        if "unknown command" in str(exc).lower():
            return "master"
        raise
    return _role(reply)


async def _cluster_role(redis: RedisCluster) -> str:
    await redis.initialize()  # the slot map, once
    replies = await redis.execute_command("ROLE", target_nodes=RedisCluster.PRIMARIES)
    if not isinstance(replies, dict):
        replies = {"": replies}  # one master: redis-py hands back its reply alone
    for reply in replies.values():
        if (role := _role(reply)) != "master":
            # A failover moved the master elsewhere: learn the new map for the next probe.
            await redis.nodes_manager.initialize()
            return role
    return "master"


def _role(reply: Any) -> str:
    role = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    return "replica" if role == "slave" else role


async def metrics_text(request: Request) -> Response:
    """Prometheus text format (``broker.metrics``); open, like the health endpoints."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics_text, methods=["GET"]),
]
