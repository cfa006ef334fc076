"""The serving commands: ``api`` and ``worker`` are the production processes (any number of
each against one Redis); ``dev`` runs both in one process, with an embedded store when
``REDIS_URL`` is unset. This module is the only one outside ``api`` and ``workers`` that
imports them, and it does so inside the commands, so the operators' commands never load them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Coroutine
from typing import Any, TypeVar

from broker import numbers
from broker.errors import ConfigError
from broker.settings import Settings
from broker.store_url import parse_store_url
from broker.structured_logs import logging_config

DEFAULT_PORT = 8000
#: Seconds an idle keep-alive connection stays open: above the load balancer's own idle
#: timeout for its upstream connections (nginx's ``keepalive_timeout``, 60 s in
#: infra/), so that it is always the balancer that closes one, never a request it just sent
#: meeting a close from here.
DEFAULT_KEEP_ALIVE_SECONDS = 75
#: Peers whose ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are believed (uvicorn's default).
DEFAULT_FORWARDED_ALLOW_IPS = "127.0.0.1"
#: Upper bound of ``--keep-alive-timeout`` and ``--drain-seconds``.
MAX_SECONDS = 3600

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class HttpOptions:
    """How ``streambroker api`` meets a load balancer (its command-line options)."""

    keep_alive_timeout: int = DEFAULT_KEEP_ALIVE_SECONDS
    #: Whether uvicorn believes the forwarded headers of ``forwarded_allow_ips``.
    proxy_headers: bool = True
    forwarded_allow_ips: str = DEFAULT_FORWARDED_ALLOW_IPS
    #: ``--drain-seconds`` as given (it overrides ``BROKER_DRAIN_SECONDS``); None: not given.
    drain_seconds: str | None = None


def http_options(
    *,
    keep_alive_timeout: str,
    forwarded_allow_ips: str | None,
    no_proxy_headers: bool,
    drain_seconds: str | None,
) -> HttpOptions:
    """The options checked, each refusal one ``ConfigError`` line naming the option."""
    try:
        keep_alive = numbers.parse_int(keep_alive_timeout, max_digits=6)
    except ValueError:
        keep_alive = 0
    if not 1 <= keep_alive <= MAX_SECONDS:
        raise ConfigError(
            f"--keep-alive-timeout must be a whole number of seconds from 1 to {MAX_SECONDS}, "
            f"not {keep_alive_timeout!r}"
        )
    if no_proxy_headers and forwarded_allow_ips is not None:
        raise ConfigError("--forwarded-allow-ips has no effect with --no-proxy-headers")
    if drain_seconds is not None:
        try:
            drain = numbers.parse_decimal(drain_seconds, max_chars=16)
        except ValueError:
            drain = -1
        if not 0 <= drain <= MAX_SECONDS:
            raise ConfigError(
                f"--drain-seconds must be a number of seconds from 0 to {MAX_SECONDS}, "
                f"not {drain_seconds!r}"
            )
    return HttpOptions(
        keep_alive_timeout=keep_alive,
        proxy_headers=not no_proxy_headers,
        forwarded_allow_ips=_trusted_proxies(forwarded_allow_ips or DEFAULT_FORWARDED_ALLOW_IPS),
        drain_seconds=drain_seconds,
    )


def _trusted_proxies(raw: str) -> str:
    """``--forwarded-allow-ips``: ``*``, or comma-separated IP addresses and networks
    (``10.0.0.0/8``). uvicorn would take anything else for a name it never meets and trust
    nobody, without a word: refused here instead."""
    entries = [entry.strip() for entry in raw.split(",")]
    if entries == ["*"]:
        return "*"
    for entry in entries:
        try:
            if "/" in entry:
                ipaddress.ip_network(entry)
            else:
                ipaddress.ip_address(entry)
        except ValueError:
            raise ConfigError(
                f"--forwarded-allow-ips: {entry!r} is not an IP address or network "
                "(give '*', or addresses and networks such as 10.0.0.0/8, comma-separated)"
            ) from None
    return ",".join(entries)


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


def api(host: str, port: int, workers: int, options: HttpOptions | None = None) -> int:
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}")
    options = options or HttpOptions()
    if options.drain_seconds is not None:
        # The app reads its settings again in each uvicorn process (the factory), from here.
        os.environ["BROKER_DRAIN_SECONDS"] = options.drain_seconds
    shared_metrics = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each uvicorn worker counts in its own process; prometheus-client's multiprocess
        # mode adds them up for /metrics through files in this directory.
        shared_metrics = tempfile.mkdtemp(prefix="streambroker-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared_metrics
    # The factory re-reads the environment in each uvicorn worker process.
    try:
        _serve(host, port, workers, options)
    finally:
        if shared_metrics is not None:
            shutil.rmtree(shared_metrics, ignore_errors=True)
    return 0


def _serve(host: str, port: int, workers: int, options: HttpOptions) -> None:
    import uvicorn

    log = Settings.from_env(os.environ).log  # as main() read it
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        timeout_keep_alive=options.keep_alive_timeout,
        # Behind a trusted proxy the client's address and scheme are the forwarded ones,
        # for the app and its access log (api.access_log) alike.
        proxy_headers=options.proxy_headers,
        forwarded_allow_ips=options.forwarded_allow_ips,
        # After the drain (api.shutdown) has ended the event streams.
        timeout_graceful_shutdown=5,
        # uvicorn applies it again in each worker process it starts; api.access_log writes
        # the request lines.
        log_config=logging_config(log.log_format, log.log_level),
        log_level=None,
        access_log=False,
    )


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
