"""Liveness and readiness: ``/healthz`` says the process answers, ``/readyz`` that the Redis
it writes to does, as a master, and that the process is not draining.

Draining (``api.shutdown``): from an exit signal until the process stops, when
``BROKER_DRAIN_SECONDS`` is above 0, ``/readyz`` answers 503 ``{"status": "draining"}``
without asking Redis, so that the load balancer stops sending new clients here while the
open ones are still served.

Ready means more than "Redis answers" (``broker.store_probe``, shared with the workers): the
node behind the pool's connections answers as a master (every master, on a Redis Cluster)
and takes a short-lived write, all within a second.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.errors import error_response
from broker import metrics
from broker.store_probe import store_problem

_RETRY = {"Retry-After": "1"}


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    exit_drain = getattr(request.app.state, "exit_drain", None)
    if exit_drain is not None and exit_drain.draining:
        return JSONResponse({"status": "draining"}, status_code=503, headers=_RETRY)
    problem = await store_problem([request.app.state.services.redis])
    if problem is not None:
        return error_response(503, "store_unavailable", problem, _RETRY)
    return JSONResponse({"status": "ready"})


async def metrics_text(request: Request) -> Response:
    """Prometheus text format (``broker.metrics``); open, like the health endpoints."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics_text, methods=["GET"]),
]
