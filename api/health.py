"""Liveness and readiness: ``/healthz`` says the process answers, ``/readyz`` that Redis does."""

from __future__ import annotations

import anyio
from redis import exceptions as redis_errors
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.errors import error_response
from broker import metrics

READY_TIMEOUT_SECONDS = 1.0


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    redis = request.app.state.services.redis
    try:
        with anyio.fail_after(READY_TIMEOUT_SECONDS):
            await redis.ping()
    except (TimeoutError, redis_errors.RedisError, OSError) as exc:
        return error_response(
            503, "store_unavailable", f"Redis does not answer: {exc}", {"Retry-After": "1"}
        )
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
