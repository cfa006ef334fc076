"""The ``streambroker`` command line: the serving commands (``dev``, ``api``, ``worker``;
``broker.cli.serve``) and the operators' (``ls``, ``tail``, ``replay``, ``export``,
``import``; ``broker.cli.operator``). Errors are one line on stderr and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from redis import exceptions as redis_errors

from broker.cli import api_server, operator, serve
from broker.errors import BrokerError, ConfigError
from broker.pg_archive.store import check_archive
from broker.settings import Settings, describe
from broker.store_url import parse_store_url
from broker.structured_logs import configure_logging


def _parser() -> argparse.ArgumentParser:
    settings_help = "\n".join(
        f"  {name:34} {default:>16}  {text}" for name, default, text in describe()
    )
    parser = argparse.ArgumentParser(
        prog="streambroker",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stream LLM output to many readers through Redis Streams, resumable SSE.",
        epilog="environment: REDIS_URL, OPENAI_BASE_URL, OPENAI_API_KEY and\n" + settings_help,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = commands.add_parser("dev", help="api + worker + store in one process, for trying it")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=serve.DEFAULT_PORT)
    dev.add_argument(
        "--store",
        choices=["auto", "redis-server", "fakeredis"],
        default="auto",
        help="embedded store when REDIS_URL is unset (default: redis-server if "
        "installed, else fakeredis)",
    )

    _add_api(commands)
    _add_worker(commands)
    operator.add_commands(commands)
    return parser


def _add_api(commands: Any) -> None:
    """``streambroker api``, with the options a load balancer needs."""
    api = commands.add_parser("api", help="an HTTP front-end (needs REDIS_URL)")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--port", type=int, default=serve.DEFAULT_PORT)
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    api.add_argument(
        "--keep-alive-timeout",
        metavar="SECONDS",
        default=str(api_server.DEFAULT_KEEP_ALIVE_SECONDS),
        help="close an idle keep-alive connection after this long (default "
        f"{api_server.DEFAULT_KEEP_ALIVE_SECONDS}); keep it above the load balancer's idle timeout "
        "for its upstream connections (nginx: keepalive_timeout, 60 s)",
    )
    api.add_argument(
        "--forwarded-allow-ips",
        metavar="LIST",
        default=None,
        help="proxies whose X-Forwarded-For/-Proto are believed: comma-separated addresses "
        f"and networks, or '*' (default {api_server.DEFAULT_FORWARDED_ALLOW_IPS})",
    )
    api.add_argument(
        "--no-proxy-headers",
        action="store_true",
        help="believe no X-Forwarded-* header: clients are the connections' peers",
    )
    api.add_argument(
        "--drain-seconds",
        metavar="SECONDS",
        default=None,
        help="on SIGTERM/SIGINT, answer /readyz 503 and keep serving this long before ending "
        "event streams and stopping; a second signal cuts it short (default: "
        "BROKER_DRAIN_SECONDS, 0)",
    )


def _add_worker(commands: Any) -> None:
    """``streambroker worker``, with its health and metrics port."""
    worker = commands.add_parser(
        "worker", help="an arq worker running generations (needs REDIS_URL)"
    )
    worker.add_argument(
        "--port",
        metavar="PORT",
        default=None,
        help="serve /healthz, /readyz and /metrics on this port (default: "
        "BROKER_METRICS_PORT; 0: none)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in operator.COMMANDS:
        return _operate(args)
    try:
        settings = Settings.from_env(os.environ)
        configure_logging(settings.log.log_format, settings.log.log_level)
        if settings.redis_url is not None:
            # A malformed REDIS_URL stops every serving command here, in one line, before
            # uvicorn or arq would meet it in a process of their own.
            parse_store_url(settings.redis_url)
        if settings.archive.archive_url:
            # As for REDIS_URL: a wrong archive URL or a database that is down stops the
            # command here, in one line; the schema is brought up to date on the way.
            asyncio.run(check_archive(settings.archive.archive_url))
        if args.command == "dev":
            return serve.dev(settings, args.host, args.port, args.store)
        if settings.redis_url is None:
            raise ConfigError(
                f"REDIS_URL is not set: `streambroker {args.command}` needs the "
                "Redis shared by every api and worker (or use `streambroker dev`)"
            )
        if args.command == "api":
            options = api_server.http_options(
                keep_alive_timeout=args.keep_alive_timeout,
                forwarded_allow_ips=args.forwarded_allow_ips,
                no_proxy_headers=args.no_proxy_headers,
                drain_seconds=args.drain_seconds,
            )
            return api_server.api(args.host, args.port, args.workers, options)
        return serve.worker(settings, serve.worker_port(args.port))
    except ConfigError as exc:
        print(f"streambroker: configuration error: {exc}", file=sys.stderr)
        return 2
    except BrokerError as exc:
        print(f"streambroker: error: {exc}", file=sys.stderr)
        return 1
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        print(f"streambroker: error: cannot reach Redis at REDIS_URL: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _operate(args: argparse.Namespace) -> int:
    """The operators' commands: HTTP clients of a running broker, not broker processes.
    Whatever ends them early is one line on stderr: scripts read the exit code, people the
    line."""
    from broker.client import ClientError

    try:
        return operator.run(args)
    except ConfigError as exc:
        _say(f"streambroker: {exc}")
        return 2
    except ClientError as exc:
        _say(f"streambroker: error: {exc}")
        return 1
    except BrokenPipeError:
        # `streambroker export x | head -1`: what was not written is lost, which a script
        # (`set -o pipefail`) must be able to tell from a whole export. Python's own flush
        # at exit would fail on the same pipe: stdout goes nowhere from here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _say("streambroker: stdout was closed before the output was complete")
        return 1
    except KeyboardInterrupt:
        _say("streambroker: interrupted")
        return 130
    except Exception as exc:  # a bug of ours; still one line, as promised
        _say(f"streambroker: unexpected error: {type(exc).__name__}: {exc}")
        return 1


def _say(line: str) -> None:
    """One line on stderr, even when the message quotes a multi-line text; and no second
    error when stderr is gone too."""
    with contextlib.suppress(OSError):
        print(" ".join(line.split()), file=sys.stderr, flush=True)
