"""A private redis-server for tests: its own free port and temp dir, torn down afterwards."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.waiting import eventually


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop_processes(processes: Iterable[subprocess.Popen[bytes] | None], timeout: float = 5) -> None:
    """End the server processes a test started, those still running: SIGTERM to every one
    first, then a wait for each, SIGKILL for one not gone within ``timeout`` seconds (a hung
    one must not hang the run). All at once: a master told to shut down alone waits for its
    replicas to acknowledge what it sent them (most of a second); stopped with it, they go
    together."""
    running = [p for p in processes if p is not None and p.poll() is None]
    for process in running:
        process.terminate()
    for process in running:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 5) -> None:
    """``stop_processes`` for one."""
    stop_processes([process], timeout)


class RedisServer:
    def __init__(
        self, binary: str, *, appendonly: bool = False, config: Path | None = None
    ) -> None:
        """``config``: a redis.conf to start from (its persistence settings are kept)."""
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sb-redis-"))
        self.url = f"redis://127.0.0.1:{self.port}/0"
        persistence = (
            []
            if config is not None
            else ["--save", "", "--appendonly", "yes" if appendonly else "no"]
        )
        self._args = [
            binary,
            *([str(config)] if config is not None else []),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            *persistence,
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(self._args, stdout=subprocess.DEVNULL)
        eventually(
            self._answers,
            timeout=timeout,
            what=f"redis-server to answer PING on port {self.port}",
        )

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown save; the data directory stays for a restart."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(5)

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_or_fail(*, config: Path | None = None) -> RedisServer:
    """Start a redis-server (``config``: see ``RedisServer``); without the binary, skip
    locally but fail under CI."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message + "; real-Redis tests must not be skipped under CI")
        pytest.skip(message)
    server = RedisServer(binary, config=config)
    server.start()
    return server


@contextmanager
def running_server(*, config: Path | None = None) -> Iterator[RedisServer]:
    """A private redis-server of its own (``start_or_fail``), stopped and removed on exit:
    the session's (``redis_server`` fixture), or another beside it."""
    server = start_or_fail(config=config)
    try:
        yield server
    finally:
        server.stop()
