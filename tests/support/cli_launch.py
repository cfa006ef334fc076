"""What a shipped file's ``streambroker …`` command would start, decided by the code itself.

``launch`` runs ``broker.cli.commands.main`` on the command line, in the file's environment,
and stops it just before it would serve: uvicorn's server (``broker.cli.api_server``) and
``serve.worker`` are replaced by recorders. A flag, a value or a setting the code would
refuse fails as it would at start-up; what it accepted comes back as a ``Launch`` (the
port, the settings, uvicorn's config).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import os
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import pytest
import uvicorn

from broker.cli import api_server, commands, serve
from broker.settings import Settings


def subparser(command: str) -> argparse.ArgumentParser:
    parser = commands._parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[command]
            return found
    raise AssertionError("the streambroker parser has no sub-commands")


def check_flags(argv: list[str], where: str) -> None:
    """Every ``--flag`` is one the sub-command defines, spelled out (argparse would take a
    prefix: ``--keep`` for ``--keep-alive-timeout``), and the whole command parses."""
    assert argv, f"{where}: an empty streambroker command"
    known = set(subparser(argv[0])._option_string_actions)
    for token in argv[1:]:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in known, f"{where}: `streambroker {argv[0]}` has no {flag} ({known})"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            commands._parser().parse_args(argv)
    except SystemExit:
        pytest.fail(
            f"{where}: `streambroker {shlex.join(argv)}` does not parse: {stderr.getvalue()}"
        )


@dataclass
class Launch:
    """What ``streambroker <argv>`` would start, as ``commands.main`` decided it."""

    command: str
    settings: Settings
    #: api: the port uvicorn listens on; worker: its health and metrics port (0: none).
    port: int
    host: str
    #: api only: the values of uvicorn's config (``host``, ``timeout_keep_alive``, …).
    uvicorn: dict[str, Any] = field(default_factory=dict)

    @property
    def drain_seconds(self) -> float:
        return float(self.settings.api.drain_seconds)


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def serving_recorded(seen: dict[str, Any]) -> Iterator[None]:
    """What would serve replaced by recorders into ``seen``: uvicorn's server, one process or
    under the supervisor of ``--workers`` (``"uvicorn"``: its config's values; ``"settings"``:
    the settings as each uvicorn process reads them), and the worker (``"worker"``: its
    arguments)."""

    def record_uvicorn(config: uvicorn.Config) -> None:
        seen["uvicorn"] = dict(vars(config))
        seen["settings"] = Settings.from_env(os.environ)  # as each uvicorn process reads it

    def server_run(server: uvicorn.Server, sockets: Any = None) -> None:
        record_uvicorn(server.config)

    class Supervisor:
        def __init__(self, config: uvicorn.Config, sockets: Any) -> None:
            self.config = config

        def run(self) -> None:
            record_uvicorn(self.config)

    real_worker = serve.worker

    def worker(*args: Any, **kwargs: Any) -> int:
        seen["worker"] = inspect.signature(real_worker).bind(*args, **kwargs).arguments
        return 0

    with (
        mock.patch.object(uvicorn.Server, "run", server_run),
        mock.patch.object(uvicorn.Config, "bind_socket", return_value=None),
        mock.patch.object(api_server, "_supervisor_class", return_value=Supervisor),
        mock.patch.object(serve, "worker", worker),
    ):
        yield


def launch(argv: list[str], env: Mapping[str, str], where: str) -> Launch:
    """Run the command line on ``argv`` in ``env``, stopped where it would start serving."""
    check_flags(argv, where)
    seen: dict[str, Any] = {}
    stderr = io.StringIO()
    with (
        environment(env),
        serving_recorded(seen),
        mock.patch.object(commands, "configure_logging", return_value=None),
        contextlib.redirect_stderr(stderr),
    ):
        code = commands.main(argv)
    assert code == 0, (
        f"{where}: `streambroker {shlex.join(argv)}` exits {code}: {stderr.getvalue()}"
    )
    if argv[0] == "api":
        kwargs = seen["uvicorn"]
        return Launch("api", seen["settings"], kwargs["port"], kwargs["host"], kwargs)
    assert argv[0] == "worker", f"{where}: only api and worker serve ({argv})"
    arguments = seen["worker"]
    chosen = arguments.get("health_port")
    worker_settings: Settings = arguments["settings"]
    port = worker_settings.generation.metrics_port if chosen is None else chosen
    return Launch("worker", worker_settings, port, worker_settings.generation.metrics_host)
