"""``streambroker api``: the api served by uvicorn, with the options a load balancer needs.

One process, or ``--workers`` processes sharing the socket under uvicorn's supervisor. The
supervisor here differs from uvicorn's in one way: a signal that arrives while it waits for
its processes to stop is passed on to them, so a second SIGTERM to the parent cuts their
drain short (``api.shutdown``), as it does for a single process.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import signal
import tempfile
from typing import TYPE_CHECKING

from broker import numbers
from broker.errors import ConfigError
from broker.settings import Settings
from broker.structured_logs import logging_config

if TYPE_CHECKING:
    from uvicorn.supervisors import Multiprocess

#: Seconds an idle keep-alive connection stays open: above the load balancer's own idle
#: timeout for its upstream connections (nginx's ``keepalive_timeout``, 60 s in
#: infra/), so that it is always the balancer that closes one, never a request it just sent
#: meeting a close from here.
DEFAULT_KEEP_ALIVE_SECONDS = 75
#: Peers whose ``X-Forwarded-For`` / ``X-Forwarded-Proto`` are believed (uvicorn's default).
DEFAULT_FORWARDED_ALLOW_IPS = "127.0.0.1"
#: Upper bound of ``--keep-alive-timeout`` and ``--drain-seconds``.
MAX_SECONDS = 3600
#: How often the supervisor looks for a signal while its processes stop.
SIGNAL_POLL_SECONDS = 0.2


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
    config = uvicorn.Config(
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
    if workers == 1:
        uvicorn.Server(config).run()
        return
    _supervisor_class()(config, sockets=[config.bind_socket()]).run()


def _supervisor_class() -> type[Multiprocess]:
    """uvicorn's supervisor, passing on signals while it waits (the module's docstring);
    made on demand, so that importing this module does not load uvicorn."""
    from uvicorn.supervisors import Multiprocess

    class SignalForwardingSupervisor(Multiprocess):
        def join_all(self) -> None:
            """Wait for every process to stop, passing on each signal that arrives
            meanwhile (uvicorn's own waits deaf to them, its handler only queues them)."""
            for process in self.processes:
                while process.process.is_alive():
                    process.process.join(SIGNAL_POLL_SECONDS)
                    if self.signal_queue:
                        self.signal_queue.clear()
                        for running in self.processes:
                            if running.process.is_alive() and running.pid is not None:
                                os.kill(running.pid, signal.SIGTERM)

    return SignalForwardingSupervisor
