"""A server program in the foreground (nginx, HAProxy) with its output in a log file:
started, waited for until its port on 127.0.0.1 accepts connections, and stopped (SIGTERM,
then SIGKILL) however the block that used it ends."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.redis_server import stop_process
from tests.support.waiting import eventually


class ServerProcess:
    def __init__(self, args: list[str], port: int, log: Path, name: str) -> None:
        self.args = args
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        try:
            eventually(
                self._listening,
                timeout=10,
                interval=0.05,
                what=lambda: f"{self.name} never listened: {self.output()}",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"{self.name} exited: {self.output()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        stop_process(self.process, timeout=10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
