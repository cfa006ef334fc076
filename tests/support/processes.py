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
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.openai_server import OpenAIServer
from tests.support.redis_server import free_port

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
        deadline = time.monotonic() + timeout
        while text not in self.output():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not print {text!r}:\n{self.output()}")
            time.sleep(0.05)

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
    deadline = time.monotonic() + timeout
    while True:
        if callable(check):
            check()
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            detail = describe() if callable(describe) else ""
            raise TimeoutError(f"{url} was not ready in {timeout}s\n{detail}")
        time.sleep(0.05)


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


@contextmanager
def api_and_worker(
    redis_url: str,
    env: Mapping[str, str] | None = None,
    *,
    worker_env: Mapping[str, str] | None = None,
) -> Iterator[ApiProcess]:
    """An api process (``env``) and a worker (``worker_env``) on one Redis, both stopped on
    exit however the block ends: the fixture most end-to-end test modules share."""
    started: list[BrokerProcess] = []
    try:
        api = ApiProcess(redis_url, env).start()
        started += [api, start_worker(redis_url, worker_env)]
        yield api
    finally:
        stop_all(started)


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
