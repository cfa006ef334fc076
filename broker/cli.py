"""The ``streambroker`` command: ``dev``, ``api`` and ``worker``; and for operators ``ls``,
``tail``, ``replay``, ``export`` and ``import`` (``broker/operator_cli.py``).

``api`` and ``worker`` are the production processes (any number of each against one Redis);
``dev`` runs both in one process, with an embedded store when ``REDIS_URL`` is unset. The
api and workers packages are imported inside the subcommands, so ``broker`` itself never
depends on them. Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from redis import exceptions as redis_errors

from broker import operator_cli
from broker.errors import BrokerError, ConfigError
from broker.logs import configure_logging, logging_config
from broker.settings import Settings, describe

DEFAULT_PORT = 8000

T = TypeVar("T")


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
    dev.add_argument("--port", type=int, default=DEFAULT_PORT)
    dev.add_argument(
        "--store",
        choices=["auto", "redis-server", "fakeredis"],
        default="auto",
        help="embedded store when REDIS_URL is unset (default: redis-server if "
        "installed, else fakeredis)",
    )

    api = commands.add_parser("api", help="an HTTP front-end (needs REDIS_URL)")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--port", type=int, default=DEFAULT_PORT)
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")

    commands.add_parser("worker", help="an arq worker running generations (needs REDIS_URL)")
    operator_cli.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in operator_cli.COMMANDS:
        return _operate(args)
    try:
        settings = Settings.from_env(os.environ)
        configure_logging(settings.log.log_format, settings.log.log_level)
        if args.command == "dev":
            return _dev(settings, args.host, args.port, args.store)
        if settings.redis_url is None:
            raise ConfigError(
                f"REDIS_URL is not set: `streambroker {args.command}` needs the "
                "Redis shared by every api and worker (or use `streambroker dev`)"
            )
        if args.command == "api":
            return _api(args.host, args.port, args.workers)
        return _worker(settings)
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
        return operator_cli.run(args)
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


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (as uvicorn does for the api): the worker's appends
    and dev's fan-out are socket-bound, and its loop is markedly cheaper per read and write."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _api(host: str, port: int, workers: int) -> int:
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}")
    shared_metrics = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each uvicorn worker counts in its own process; prometheus-client's multiprocess
        # mode adds them up for /metrics through files in this directory.
        shared_metrics = tempfile.mkdtemp(prefix="streambroker-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared_metrics
    # The factory re-reads the environment in each uvicorn worker process.
    try:
        _serve(host, port, workers)
    finally:
        if shared_metrics is not None:
            shutil.rmtree(shared_metrics, ignore_errors=True)
    return 0


def _serve(host: str, port: int, workers: int) -> None:
    import uvicorn

    log = Settings.from_env(os.environ).log  # as main() read it
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        timeout_graceful_shutdown=5,
        # uvicorn applies it again in each worker process it starts; api.access_log writes
        # the request lines.
        log_config=logging_config(log.log_format, log.log_level),
        log_level=None,
        access_log=False,
    )


def _worker(settings: Settings) -> int:
    from workers.worker import create_worker

    async def run() -> None:
        worker = create_worker(settings)  # handles SIGINT/SIGTERM: finishes and closes
        try:
            await worker.async_run()
        except asyncio.CancelledError:
            pass
        finally:
            await worker.close()

    _run(run())
    return 0


def _dev(settings: Settings, host: str, port: int, store_kind: str) -> int:
    from broker.embedded import EmbeddedStore

    if settings.redis_url:
        print(f"streambroker dev: using REDIS_URL={settings.redis_url}", flush=True)
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
