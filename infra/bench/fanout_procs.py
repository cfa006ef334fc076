"""The processes ``fanout.py`` runs: redis-server, broker api and workers, the baseline relay.

Every one is started on a free port of 127.0.0.1, in its own session (a Ctrl-C reaches only
``fanout.py``, which then stops them in order), with its output in a log file, and with
``PR_SET_PDEATHSIG`` so the kernel ends it should ``fanout.py`` itself be killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import redis

BASELINE = Path(__file__).resolve().parent / "baseline_relay.py"


class BenchError(Exception):
    """A run could not be measured (a process died, something was not ready in time)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_fd_limit() -> int:
    """Lets ``fanout.py`` and its children (which inherit it) hold thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return max(soft, wanted)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the parent thread dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, chars: int = 2000) -> str:
        return tail(self.log, chars)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise BenchError(
                f"{self.name} exited with {self.popen.returncode}; its log ends:\n{self.tail()}"
            )

    def serving_process(self) -> psutil.Process:
        """The process that serves HTTP: this one (uvicorn with one worker serves in its own
        process), or its only child should a supervisor ever sit in between."""
        process = psutil.Process(self.pid)
        kids = process.children()
        return kids[0] if len(kids) == 1 else process


def tail(path: Path, chars: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-chars:]
    return ""


class Processes:
    """Every server process of the run; each is stopped before ``fanout.py`` exits."""

    def __init__(self, logdir: Path, env: dict[str, str], cwd: Path) -> None:
        self.logdir = logdir
        self.env = env
        self.cwd = cwd
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str]) -> Child:
        log = self.logdir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Servers are started from the main thread while no other thread runs.
                preexec_fn=_die_with_parent,
            )
        child = Child(name, popen, log)
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 10) -> None:
        if child.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGCONT)  # a paused worker would not see SIGTERM
                child.popen.terminate()
            try:
                child.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait(5)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)


def wait_until(check: Callable[[], bool], child: Child, what: str, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        child.check_alive()
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise BenchError(f"{what} not ready within {limit_s:g}s; its log:\n{child.tail()}")
        time.sleep(0.05)


def start_redis(procs: Processes, datadir: Path, maxclients: int) -> tuple[str, Child]:
    """A private redis-server: no persistence, and room for every connection of a scenario
    (the baseline holds one per client, the api's pool stays open beside it)."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(datadir)]
    argv += ["--save", "", "--appendonly", "no", "--maxclients", str(maxclients)]
    child = procs.start("redis", argv)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        wait_until(lambda: bool(client.ping()), child, "redis-server")
    finally:
        client.close()
    return url, child


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=1).status_code == 200


def start_api(procs: Processes, name: str) -> tuple[str, Child]:
    port = free_port()
    argv = [sys.executable, "-m", "broker", "api", "--host", "127.0.0.1", "--port", str(port)]
    child = procs.start(name, [*argv, "--workers", "1"])
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _http_ok(f"{url}/readyz"), child, name)
    return url, child


def start_baseline(
    procs: Processes, name: str, redis_url: str, heartbeat: float
) -> tuple[str, Child]:
    port = free_port()
    argv = [sys.executable, str(BASELINE), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--redis-url", redis_url, "--heartbeat", f"{heartbeat:g}"]
    child = procs.start(name, argv)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _http_ok(f"{url}/healthz"), child, name)
    return url, child


@dataclass
class Infra:
    """What lives for the whole run: Redis and the workers."""

    procs: Processes
    redis_url: str
    redis_port: int
    workers: list[Child]
    #: With ``--pin``: the core the measured server gets to itself.
    server_core: int | None = None

    def pause_workers(self) -> None:
        """SIGSTOP: generations created now stay queued, with no event, until resumed."""
        for worker in self.workers:
            worker.check_alive()
            os.kill(worker.pid, signal.SIGSTOP)

    def resume_workers(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGCONT)

    def workers_cpu(self) -> float:
        total = 0.0
        for worker in self.workers:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(worker.pid).cpu_times()
                total += times.user + times.system
        return total
