"""A worker's HTTP endpoint: ``/healthz``, ``/readyz`` and ``/metrics``.

Served on ``BROKER_METRICS_PORT`` (``streambroker worker --port``; 0: none) by a small
Starlette app under ``uvicorn.Server``, as a task of the worker's own event loop: an answer
proves that loop runs. The server installs no signal handler (SIGINT and SIGTERM belong to
the arq worker), runs no lifespan and writes no access log. Its socket is bound before the
worker starts, so a port already taken stops start-up at once (``listen``).

- ``GET /healthz`` (liveness): 200 ``{"status": "ok"}`` while the worker's queue poll has run
  within ``STALL_SECONDS`` (``WorkerHealth.beat``, called by every poll; a poll that waits on
  an unreachable Redis backs off for at most a second, so an outage alone never stalls it).
  503 ``worker_stalled`` when it has not: the loop answers but the worker is stuck. 503
  ``{"status": "draining"}`` once the worker is stopping for good.
- ``GET /readyz`` (readiness): 200 ``{"status": "ready"}`` when the worker can take jobs: the
  Redis it polls answers within ``READY_TIMEOUT_SECONDS`` as a master that takes a write
  (as the api's ``/readyz``, through the worker's own connections: arq's, and on a Redis
  Cluster every master through the generations' client). 503 ``store_unavailable`` when not,
  and 503 ``{"status": "draining"}`` from the moment the worker was told to stop (SIGTERM,
  SIGINT) until its server closes, while it ends the generations it was running.
- ``GET /metrics`` (and ``/``, where the worker's metrics were served before): the Prometheus
  text of ``broker.metrics``, with the queue's figures read from Redis first
  (``QueueReader``: bounded, and at most once a second however many scrapers ask).

(The api's ``api.health`` asks Redis the same way: ``broker.store_probe``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Iterator

import redis.asyncio as aioredis
import uvicorn
from arq.constants import in_progress_key_prefix
from redis import exceptions as redis_errors
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker import keys, metrics
from broker.errors import ConfigError
from broker.log_errors import reply_text
from broker.store_connections import StoreClient
from broker.store_probe import store_problem

logger = logging.getLogger("streambroker.worker")

#: Longest the queue poll may go without a turn before the worker counts as stuck. A poll
#: turn is milliseconds; while Redis is away it backs off for at most a second; a turn
#: that hangs this long is waiting on a Redis that no longer answers on an open connection.
STALL_SECONDS = 30.0
#: Longest ``/metrics`` waits for the queue's figures; then they are left out.
QUEUE_TIMEOUT_SECONDS = 1.0
#: How long one reading of the queue serves every scrape.
QUEUE_CACHE_SECONDS = 1.0
#: Jobs due in the queue that one reading examines (oldest first); beyond, counted as waiting.
QUEUE_SCAN_LIMIT = 1000
#: How long, at most, the server waits for requests in progress when it stops.
SHUTDOWN_SECONDS = 2

_RETRY = {"Retry-After": "1"}


class WorkerHealth:
    """What the endpoints report, kept up to date by the worker that runs them."""

    def __init__(self, *, watches_poll: bool = True) -> None:
        #: False under arq's own command line, whose plain ``arq.Worker`` cannot be watched.
        self.watches_poll = watches_poll
        self.polled_at = time.monotonic()
        self.draining = False
        #: The worker's clients, asked by ``/readyz``: arq's first (the queue's node).
        self.stores: tuple[StoreClient, ...] = ()
        self.queue = QueueReader()

    def beat(self) -> None:
        """The queue poll took another turn."""
        self.polled_at = time.monotonic()

    def drain(self) -> None:
        """The worker was told to stop: it takes no job from now on."""
        self.draining = True

    def watch(self, queue: aioredis.Redis, generations: StoreClient | None = None) -> None:
        """The worker's clients: arq's (``queue``) and, when it is another one (on a Redis
        Cluster), the one generations are written through."""
        others = () if generations is None or generations is queue else (generations,)
        self.stores = (queue, *others)
        self.queue.redis = queue

    def stalled_for(self) -> float | None:
        """Seconds since the poll's last turn, when that is too long; else None."""
        since = time.monotonic() - self.polled_at
        return since if self.watches_poll and since > STALL_SECONDS else None


class QueueReader:
    """Reads the queue's figures into ``metrics.QUEUE``, at most once per
    ``QUEUE_CACHE_SECONDS``, and within ``QUEUE_TIMEOUT_SECONDS``."""

    def __init__(self) -> None:
        self.redis: aioredis.Redis | None = None
        self._read_at = -math.inf
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        if self.redis is None:
            return
        async with self._lock:  # concurrent scrapes share one reading
            if time.monotonic() - self._read_at < QUEUE_CACHE_SECONDS:
                return
            try:
                async with asyncio.timeout(QUEUE_TIMEOUT_SECONDS):
                    depth, oldest = await queue_figures(self.redis)
            except (TimeoutError, redis_errors.RedisError, OSError) as exc:
                metrics.QUEUE.clear()
                logger.debug("queue figures left out of /metrics: %s", reply_text(exc))
            else:
                metrics.QUEUE.set(depth, oldest)
            self._read_at = time.monotonic()


async def queue_figures(redis: aioredis.Redis) -> tuple[int, float]:
    """How many jobs wait for a worker, and how long (seconds) the oldest has waited.

    arq keeps a job in its queue (a sorted set scored by when it is due, in ms) while it
    runs, so the due jobs whose in-progress key exists are running, not waiting; jobs
    deferred to later (a retry) are not due yet. Two round trips: the oldest
    ``QUEUE_SCAN_LIMIT`` due jobs and the count of all of them, then their in-progress keys
    (in the control slot with the queue, so one node answers both on a Redis Cluster). Due
    jobs past the limit are counted as waiting.
    """
    now_ms = time.time() * 1000
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(
            keys.QUEUE_NAME, "-inf", now_ms, start=0, num=QUEUE_SCAN_LIMIT, withscores=True
        )
        pipe.zcount(keys.QUEUE_NAME, "-inf", now_ms)
        due, due_count = await pipe.execute()
    if not due:
        return 0, 0.0
    async with redis.pipeline(transaction=False) as pipe:
        for job_id, _ in due:
            pipe.exists(in_progress_key_prefix + job_id.decode())
        running = await pipe.execute()
    waiting = [score for (_, score), busy in zip(due, running, strict=True) if not busy]
    unscanned = max(0, due_count - len(due))
    oldest = waiting[0] if waiting else due[-1][1] if unscanned else now_ms
    return len(waiting) + unscanned, max(0.0, (now_ms - oldest) / 1000)


# -- the endpoints -------------------------------------------------------------------------


def _error(code: str, message: str) -> JSONResponse:
    """The api's error shape (``api.errors``), with its ``Retry-After``."""
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=503, headers=_RETRY)


def _draining() -> JSONResponse:
    return JSONResponse({"status": "draining"}, status_code=503, headers=_RETRY)


def health_app(health: WorkerHealth) -> Starlette:
    async def healthz(request: Request) -> Response:
        if health.draining:
            return _draining()
        stalled = health.stalled_for()
        if stalled is not None:
            return _error(
                "worker_stalled",
                f"the worker's queue poll has not run for {stalled:.0f} s (stuck)",
            )
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if health.draining:
            return _draining()
        problem = await store_problem(health.stores)
        if problem is not None:
            return _error("store_unavailable", problem)
        return JSONResponse({"status": "ready"})

    async def metrics_text(request: Request) -> Response:
        await health.queue.refresh()
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_text, methods=["GET"]),
            Route("/", metrics_text, methods=["GET"]),
        ]
    )


# -- the server ----------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` for the endpoint. A port another process holds is
    a ``ConfigError`` (one line, exit code 2): a second worker given the same port, or a
    port in use, must be fixed, not run without its probes."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot serve the worker's health and metrics on {host}:{port}: "
            f"{exc.strerror or exc}; give each worker on a machine its own port "
            "(streambroker worker --port, or BROKER_METRICS_PORT; 0: none)"
        ) from None
    return sock


class _SignalFreeServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Installs nothing: SIGINT and SIGTERM are the arq worker's, which drains, ends
        its jobs, then stops this server."""
        yield


class HealthServer:
    """``health_app`` on an already listening socket, as a task of the running loop."""

    def __init__(self, health: WorkerHealth, listener: socket.socket) -> None:
        self.listener = listener
        config = uvicorn.Config(
            health_app(health),
            lifespan="off",
            access_log=False,
            # The process's logging is configured already (broker.structured_logs).
            log_config=None,
            log_level=None,
            proxy_headers=False,
            server_header=False,
            ws="none",
            timeout_graceful_shutdown=SHUTDOWN_SECONDS,
        )
        self._server = _SignalFreeServer(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        """Serve from now on (connections queue on the socket until the first turn)."""
        logger.info("health and metrics on http://%s (/healthz, /readyz, /metrics)", self.address)
        self._task = asyncio.create_task(
            self._server.serve(sockets=[self.listener]), name="health-server"
        )

    async def stop(self) -> None:
        """Stop serving, within ``SHUTDOWN_SECONDS`` for the requests in progress."""
        if self._task is None:
            self.listener.close()
            return
        self._server.should_exit = True
        try:
            await self._task
        except Exception:
            logger.exception("the health endpoint failed")
        finally:
            self._task = None
