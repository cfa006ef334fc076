"""Real broker processes for end-to-end tests: ``streambroker api`` / ``worker`` / ``dev``.

Each process runs ``python -m broker ...`` with its own environment, logs to a file (shown
when a start fails), and is stopped with SIGTERM, then SIGKILL if it does not exit in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import redis

from tests.support.openai_server import OpenAIServer
from tests.support.redis_server import free_port
from tests.support.waiting import eventually

if TYPE_CHECKING:
    from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]


class BrokerProcess:
    def __init__(self, *args: str, env: Mapping[str, str], name: str) -> None:
        self.args = [sys.executable, "-m", "broker", *args]
        self.name = name
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("BROKER_", "OPENAI_")) and k != "REDIS_URL"
        }
        self.env = {**base, "PYTHONUNBUFFERED": "1", **env}
        self.log_path = Path(tempfile.mkstemp(prefix=f"sb-{name}-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BrokerProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.args, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 20.0) -> None:
        def printed() -> bool:
            self._check_alive()
            return text in self.output()

        eventually(
            printed,
            timeout=timeout,
            interval=0.05,
            what=lambda: f"{self.name} to print {text!r}:\n{self.output()}",
        )

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}:\n{self.output()}"
            )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log_path.unlink(missing_ok=True)
        return self.process.returncode


class ApiProcess(BrokerProcess):
    def __init__(self, redis_url: str, env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            "api",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            env={"REDIS_URL": redis_url, **(env or {})},
            name=f"api-{self.port}",
        )

    def start(self) -> ApiProcess:
        super().start()
        try:
            wait_ready(self.url, check=self._check_alive, describe=self.output)
        except BaseException:
            self.stop()  # the caller never got hold of it: nobody else would stop it
            raise
        return self


def wait_ready(
    url: str, *, check: object = None, describe: object = None, timeout: float = 30.0
) -> None:
    """Poll ``/readyz`` until it answers 200, with a deadline."""

    def ready() -> bool:
        if callable(check):
            check()
        try:
            return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    eventually(
        ready,
        timeout=timeout,
        interval=0.05,
        what=lambda: f"{url} to be ready\n{describe() if callable(describe) else ''}",
    )


def start_worker(redis_url: str, env: Mapping[str, str] | None = None) -> BrokerProcess:
    worker = BrokerProcess(
        "worker", env={"REDIS_URL": redis_url, **(env or {})}, name="worker"
    ).start()
    try:
        worker.wait_for_output("Starting worker")
    except BaseException:
        worker.stop()
        raise
    return worker


def stop_all(processes: list[BrokerProcess]) -> None:
    for process in processes:
        if process.process is not None and process.process.poll() is None:
            process.process.send_signal(signal.SIGTERM)
    for process in processes:
        process.stop()


class Launcher:
    """Starts what a test runs against on one Redis, and stops all of it on ``close()``:
    api and worker processes, and the real app in-process under Starlette's ``TestClient``
    (its lifespan run). The ``launch`` fixture (``tests/conftest.py``) is one per test; a
    module-scoped fixture uses it as a context manager (``with Launcher(url) as launch:``).
    """

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self._processes: list[BrokerProcess] = []
        self._stack = ExitStack()
        self._stack.callback(stop_all, self._processes)

    def api(self, env: Mapping[str, str] | None = None, *, redis_url: str = "") -> ApiProcess:
        """An api process on a free port, ready (``/readyz`` answered 200)."""
        process = ApiProcess(redis_url or self.redis_url, env)
        self._processes.append(process)
        return process.start()

    def worker(self, env: Mapping[str, str] | None = None, *, redis_url: str = "") -> BrokerProcess:
        """A worker process, started (it said so)."""
        process = start_worker(redis_url or self.redis_url, env)
        self._processes.append(process)
        return process

    def api_and_worker(
        self, env: Mapping[str, str] | None = None, *, worker_env: Mapping[str, str] | None = None
    ) -> ApiProcess:
        """An api (``env``) and a worker (``worker_env``): the usual broker."""
        api = self.api(env)
        self.worker(worker_env)
        return api

    def adopt(self, process: BrokerProcess) -> BrokerProcess:
        """A process the test builds itself (``BrokerProcess(...)``), stopped with the rest."""
        self._processes.append(process)
        return process

    def app(
        self,
        env: Mapping[str, str] | None = None,
        *,
        flush: bool = False,
        raise_server_exceptions: bool = True,
        redis_url: str = "",
    ) -> TestClient:
        """The real app in-process, configured as ``Settings.from_env`` reads ``env`` (plus
        ``REDIS_URL``: the launcher's, or ``redis_url``); ``flush``: on an emptied store."""
        from starlette.testclient import TestClient

        from api.app import create_app
        from broker.settings import Settings

        if flush:
            self.flush()
        settings = Settings.from_env({"REDIS_URL": redis_url or self.redis_url, **(env or {})})
        client = TestClient(create_app(settings), raise_server_exceptions=raise_server_exceptions)
        return self._stack.enter_context(client)

    def flush(self) -> None:
        """Empty the store (``FLUSHALL``): nothing another test or module left in it."""
        with redis.Redis.from_url(self.redis_url) as store:
            store.flushall()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextmanager
def api_and_worker(
    redis_url: str,
    env: Mapping[str, str] | None = None,
    *,
    worker_env: Mapping[str, str] | None = None,
) -> Iterator[ApiProcess]:
    """An api process (``env``) and a worker (``worker_env``) on one Redis, both stopped on
    exit however the block ends: the fixture most end-to-end test modules share."""
    with Launcher(redis_url) as launch:
        yield launch.api_and_worker(env, worker_env=worker_env)


@contextmanager
def broker_on_upstream(
    redis_url: str, env: Mapping[str, str] | None = None
) -> Iterator[tuple[ApiProcess, OpenAIServer]]:
    """An api process and a worker whose upstream is a local ``OpenAIServer`` (its
    ``echo-model``, ``tool-model``…), with a 0.3 s heartbeat; ``env`` adds to that."""
    with OpenAIServer() as upstream:
        env = {
            "OPENAI_BASE_URL": upstream.base_url,
            "BROKER_HEARTBEAT_SECONDS": "0.3",
            **(env or {}),
        }
        with api_and_worker(redis_url, env, worker_env=env) as api:
            yield api, upstream


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    text: bool = False,
    timeout: float = 60,
) -> subprocess.CompletedProcess[Any]:
    """``python -m broker <args>`` run to its end, as a user runs ``streambroker``: a bare
    environment (``PATH``, ``HOME=/tmp``, then ``env``), its output captured (as ``str``
    with ``text``, else bytes)."""
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        env={"PATH": os.environ["PATH"], "HOME": "/tmp", **(env or {})},
        input=stdin,
        capture_output=True,
        text=text,
        timeout=timeout,
        check=False,
    )


class ApiProcessWith(ApiProcess):
    """An ``ApiProcess`` given more command-line options (``--drain-seconds 5``, …)."""

    def __init__(self, redis_url: str, *options: str, env: Mapping[str, str] | None = None) -> None:
        super().__init__(redis_url, env)
        self.args.extend(options)


class WorkerWithEndpoint(BrokerProcess):
    """``streambroker worker --port P``: a worker serving ``/healthz``, ``/readyz`` and
    ``/metrics`` on a free port of 127.0.0.1 (``url``); started once it said so."""

    def __init__(self, redis_url: str, env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            "worker",
            "--port",
            str(self.port),
            env={"REDIS_URL": redis_url, "BROKER_METRICS_HOST": "127.0.0.1", **(env or {})},
            name=f"worker-{self.port}",
        )

    def start(self) -> WorkerWithEndpoint:
        super().start()
        try:
            self.wait_for_output("Starting worker")
        except BaseException:
            self.stop()
            raise
        return self
