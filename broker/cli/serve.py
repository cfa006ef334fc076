"""The serving commands: ``api`` and ``worker`` are the production processes (any number of
each against one Redis); ``dev`` runs both in one process, with an embedded store when
``REDIS_URL`` is unset. This module is the only one outside ``api`` and ``workers`` that
imports them, and it does so inside the commands, so the operators' commands never load them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from broker import numbers
from broker.errors import ConfigError
from broker.settings import Settings
from broker.store_url import parse_store_url

DEFAULT_PORT = 8000

T = TypeVar("T")


def worker_port(raw: str | None) -> int | None:
    """``streambroker worker --port``: None when not given (``BROKER_METRICS_PORT`` then)."""
    if raw is None:
        return None
    try:
        port = numbers.parse_int(raw, max_digits=5)
    except ValueError:
        port = -1
    if not 0 <= port <= 65_535:
        raise ConfigError(
            f"--port must be a port number from 0 to 65535 (0: no health or metrics "
            f"endpoint), not {raw!r}"
        )
    return port


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (as uvicorn does for the api): the worker's appends
    and dev's fan-out are socket-bound, and its loop is markedly cheaper per read and write."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def worker(settings: Settings, health_port: int | None = None) -> int:
    """``health_port``: where the worker serves its health and metrics (None:
    ``BROKER_METRICS_PORT``; 0: nowhere). A port another process holds stops it here."""
    from workers.worker import create_worker

    async def run() -> None:
        # Handles SIGINT/SIGTERM: drains, ends its jobs and closes.
        worker = create_worker(settings, health_port=health_port)
        try:
            await worker.async_run()
        except asyncio.CancelledError:
            pass
        finally:
            await worker.close()

    _run(run())
    return 0


def dev(settings: Settings, host: str, port: int, store_kind: str) -> int:
    from broker.cli.embedded_store import EmbeddedStore

    if settings.redis_url:
        shown = parse_store_url(settings.redis_url).describe()  # without its password
        print(f"streambroker dev: using REDIS_URL: {shown}", flush=True)
        return _run(_serve_dev(settings, host, port))
    # uvicorn re-raises SIGTERM once it has shut down; with Python's default handler that
    # would kill the process before the embedded store is stopped and its files removed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with EmbeddedStore(store_kind) as store:  # type: ignore[arg-type]
        print(f"streambroker dev: store: {store.describe()}", flush=True)
        if store.kind == "fakeredis":
            from workers.worker import tolerate_store_without_info

            tolerate_store_without_info()
        embedded = dataclasses.replace(settings, redis_url=store.url)
        return _run(_serve_dev(embedded, host, port))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


async def _serve_dev(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from api.app import create_app
    from broker import metrics
    from workers.worker import create_worker

    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        # main() configured logging; api.access_log writes the request lines.
        log_config=None,
        log_level=None,
        access_log=False,
        timeout_graceful_shutdown=3,
    )
    server = _announcing_server_class()(config)
    worker = create_worker(settings, handle_signals=False)
    metrics.set_process_role("dev")  # api and worker in one process
    worker_task = asyncio.create_task(worker.async_run())
    worker_failed = False

    def stop_if_the_worker_died(task: asyncio.Task[None]) -> None:
        # A dev broker whose worker is gone would accept generations that never run.
        nonlocal worker_failed
        if not task.cancelled() and task.exception() is not None:
            worker_failed = True
            print(
                f"streambroker dev: the worker stopped: {task.exception()!r}; shutting down",
                file=sys.stderr,
                flush=True,
            )
            server.should_exit = True

    worker_task.add_done_callback(stop_if_the_worker_died)
    try:
        await server.serve()
    finally:
        worker_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await worker_task
        await worker.close()
    return 0 if server.started and not worker_failed else 1


def _announcing_server_class() -> type:
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        """Prints the URL once the socket is bound (uvicorn's own line is easy to miss)."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                host = self.config.host
                shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
                print(
                    f"streambroker dev: serving http://{shown}:{self.config.port} (api + worker "
                    "in this process; try model 'fake'; operator console at "
                    f"http://{shown}:{self.config.port}/console; Ctrl-C stops)",
                    flush=True,
                )

    return AnnouncingServer
