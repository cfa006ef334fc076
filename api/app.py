"""The Starlette application: ``create_app(settings)`` and its lifespan.

The lifespan owns every client: one bounded Redis client (the log's reads and writes, and
the job queue: ``GenerationLog.create``), the reader hub and the upstream model catalog.
Nothing a client needs lives only in this process, so any number of replicas can serve any
client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.types import Receive, Scope, Send

from api import (
    archive,
    console,
    demo,
    event_stream,
    health,
    listing,
    model_list,
    openai_compat,
    read_tokens,
    streams,
)
from api.access_log import AccessLog
from api.connection_slots import ConnectionSlots
from api.errors import EXCEPTION_HANDLERS
from api.header_limits import HeaderLimit
from api.hub import ReaderHub
from api.live_writes import SERVER_SEND
from api.model_catalog import ModelCatalog
from api.services import Services
from api.shared_reads import SharedReads
from api.shutdown import ExitDrain, drain_on_exit_signals
from broker import metrics
from broker.gc_tuning import freeze_startup_objects
from broker.generation_log import GenerationLog
from broker.pg_archive.store import connect_archive
from broker.settings import Settings
from broker.store_connections import StoreClient, api_client
from broker.store_url import StoreAddress, parse_store_url
from broker.sweeper import LeaseSweeper

#: The name of the api pool's connections in Redis's CLIENT LIST (the hub's: ``api.hub``).
API_CLIENT_NAME = "streambroker-api"
#: How long a request waits for a free connection of the pool before it answers 503.
POOL_WAIT_SECONDS = 10


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app; with no settings, read them from the environment (uvicorn's factory)."""
    settings = settings or Settings.from_env(os.environ)
    metrics.set_process_role("api")
    store = parse_store_url(settings.require_redis_url("the api needs the Redis its workers share"))
    return BrokerApp(
        routes=[
            *health.routes,
            *model_list.routes,
            *listing.routes,
            *archive.routes,
            *streams.routes,
            *event_stream.routes,
            *openai_compat.routes,
            *read_tokens.routes,
            *console.routes,
            *demo.routes,
        ],
        middleware=[
            # First, so that it also logs what the middlewares after it answer (431).
            Middleware(AccessLog),
            Middleware(HeaderLimit, max_bytes=settings.api.max_header_bytes),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=functools.partial(_lifespan, settings=settings, store=store),
    )


class BrokerApp(Starlette):
    """Starlette, plus one thing no middleware can do: each request's scope keeps the
    ``send`` the server itself gave (``SERVER_SEND``), under every middleware's wrapper,
    for the reader hub's live writes (``api.live_writes``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        scope[SERVER_SEND] = send
        try:
            await super().__call__(scope, receive, send)
        finally:
            # The server's request cycle holds the scope; no reference cycle outlives it.
            scope.pop(SERVER_SEND, None)


@contextlib.asynccontextmanager
async def _lifespan(
    app: Starlette, *, settings: Settings, store: StoreAddress
) -> AsyncIterator[None]:
    """Open the process's clients, start its background tasks, and undo both on the way out."""
    # No ping here: the api starts while Redis is down and /readyz reports it. The client
    # is bounded whatever the number of clients: requests wait for a free connection.
    redis = api_client(
        store,
        max_connections=settings.api.redis_connections,
        wait_seconds=POOL_WAIT_SECONDS,
        client_name=API_CLIENT_NAME,
    )
    services = _services(settings, store, redis)
    app.state.services = services
    if settings.archive.archive_url:
        services.log.archive = await connect_archive(settings.archive)
    await services.hub.start()
    background = _start_background_tasks(services)
    freeze_startup_objects()
    # On SIGTERM/SIGINT, answer /readyz 503 for BROKER_DRAIN_SECONDS, then end every event
    # stream cleanly before uvicorn waits for them.
    app.state.exit_drain = ExitDrain(
        asyncio.get_running_loop(), services.hub.drain, seconds=settings.api.drain_seconds
    )
    undo = drain_on_exit_signals(app.state.exit_drain)
    try:
        yield
    finally:
        undo()
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await services.aclose()
        if services.log.archive is not None:
            await services.log.archive.close()


def _services(settings: Settings, store: StoreAddress, redis: StoreClient) -> Services:
    """The clients every request shares, on the one bounded client (the hub's reads of new
    events have connections of their own)."""
    hub = ReaderHub(
        store,
        redis,
        buffer_frames=settings.api.subscriber_buffer_frames,
        check_seconds=settings.api.heartbeat_seconds,
    )
    log = GenerationLog.from_settings(redis, settings.generation)
    return Services(
        settings=settings,
        redis=redis,
        log=log,
        catalog=ModelCatalog(settings),
        hub=hub,
        slots=ConnectionSlots(
            redis,
            limit=settings.api.max_connections_per_tenant,
            slot_seconds=settings.api.connection_slot_seconds,
        ),
        catch_up=SharedReads(log),
    )


def _start_background_tasks(services: Services) -> list[asyncio.Task[None]]:
    """The lease sweeper, and the renewal of this process's connection slots if they count."""
    generation = services.settings.generation
    # Workers sweep too; here as well so that generations end even with no worker alive.
    sweeper = LeaseSweeper.from_settings(
        services.log, owner=f"api:{socket.gethostname()}:{os.getpid()}", settings=generation
    )
    background = [asyncio.create_task(sweeper.run(generation.sweep_seconds), name="lease-sweeper")]
    if services.slots.enabled:
        background.append(
            asyncio.create_task(services.slots.renew_forever(), name="connection-slots")
        )
    return background
