"""The store ``streambroker dev`` brings along when ``REDIS_URL`` is unset.

A private ``redis-server`` (its own free port and temp dir, gone on exit) when the binary is
installed — the real thing, so dev behaves like production; otherwise an in-process fakeredis
server (with Lua), so a machine with nothing but Python still runs the whole broker.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any, Literal

from broker.errors import BrokerError

StoreKind = Literal["auto", "redis-server", "fakeredis"]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _answers_ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")  # RESP: fakeredis knows no inline commands
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _fakeredis_server(host: str, port: int) -> Any:
    """A fakeredis TCP server whose connections survive error replies.

    fakeredis's TCP handler closes the connection after any error reply, but redis-py relies
    on error replies that are part of normal operation: a script runs as ``EVALSHA`` first
    and falls back to ``EVAL`` on ``NOSCRIPT``, and the broker's scripts refuse stale writers
    with errors. The handler is swapped (``RequestHandlerClass`` is socketserver's hook) for
    one that hands such replies back to the client like any other.
    """
    import redis
    from fakeredis import TcpFakeServer

    server = TcpFakeServer((host, port), server_type="redis")
    server.daemon_threads = True
    base: Any = server.RequestHandlerClass

    class KeepOpenOnErrorReplies(base):  # type: ignore[misc]
        def setup(self) -> None:
            super().setup()
            read_response = self.current_client.read_response

            def read_or_error(*args: Any, **kwargs: Any) -> Any:
                try:
                    return read_response(*args, **kwargs)
                except redis.ResponseError as exc:
                    return exc  # encoded as a RESP error reply, connection kept

            self.current_client.read_response = read_or_error

    server.RequestHandlerClass = KeepOpenOnErrorReplies
    return server


class EmbeddedStoreError(BrokerError):
    """The embedded store could not be started."""


class EmbeddedStore:
    HOST = "127.0.0.1"

    def __init__(self, kind: StoreKind = "auto") -> None:
        binary = shutil.which("redis-server")
        if kind == "redis-server" and binary is None:
            raise EmbeddedStoreError("--store redis-server: redis-server is not installed")
        self.kind: StoreKind = "redis-server" if kind != "fakeredis" and binary else "fakeredis"
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._server: Any = None
        self._dir: str | None = None
        self.port = _free_port(self.HOST)
        self.url = f"redis://{self.HOST}:{self.port}/0"

    def describe(self) -> str:
        if self.kind == "redis-server":
            return (
                f"private redis-server on port {self.port} (data in {self._dir}, deleted on exit)"
            )
        return (
            f"in-process fakeredis on port {self.port} (no redis-server installed; data in memory)"
        )

    def start(self, timeout: float = 10.0) -> None:
        if self.kind == "redis-server":
            assert self._binary is not None
            self._dir = tempfile.mkdtemp(prefix="streambroker-dev-")
            self._process = subprocess.Popen(
                [
                    self._binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    self.HOST,
                    "--dir",
                    self._dir,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--logfile",
                    f"{self._dir}/redis.log",
                ],
                stdout=subprocess.DEVNULL,
            )
        else:
            self._server = _fakeredis_server(self.HOST, self.port)
            threading.Thread(
                target=self._server.serve_forever, name="fakeredis", daemon=True
            ).start()
        deadline = time.monotonic() + timeout
        while not _answers_ping(self.HOST, self.port):
            if self._process is not None and self._process.poll() is not None:
                self.stop()
                raise EmbeddedStoreError(
                    f"redis-server exited with code {self._process.returncode}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedStoreError(f"the embedded store did not answer within {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedStore:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
