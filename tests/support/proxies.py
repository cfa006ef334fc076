"""The shipped load balancers, nginx and HAProxy, run in front of fake api processes.

A ``FakeApi`` records what reaches it and answers as the test sets it to (an unfinished
event stream, a 503, a failing ``/readyz``); ``nginx_in_front`` and ``haproxy_in_front`` run
the shipped configuration with only the fakes' ports and a free port of its own substituted.
``PROXIES`` parametrizes a test over both.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy_files import HAPROXY_CFG
from tests.support.deploy_tools import run, tool
from tests.support.nginx import Nginx
from tests.support.proxy_configs import haproxy_api_servers_block
from tests.support.redis_server import free_port
from tests.support.server_process import ServerProcess


class FakeApiHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeApiServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.answer()

    def do_POST(self) -> None:
        self.answer()

    def answer(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        fake.requests.append((self.command, self.path, headers))
        if self.path == "/readyz":
            return self.send_json(fake.readyz_status)
        if self.path.endswith("/events") and fake.status == 200:
            return self.send_events()
        self.send_json(fake.status)

    def send_json(self, status: int) -> None:
        body = json.dumps({"status": status, "port": self.server.fake.port}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_events(self) -> None:
        # No X-Accel-Buffering: the proxy's own configuration must stream.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in (b"id: 42\ndata: first\n\n", None, b"id: 43\ndata: last\n\n", b""):
            if chunk is None:
                self.server.fake.release.wait(5)
                continue
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()


class FakeApiServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeApi) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), FakeApiHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a proxy closing a connection it gave up on, as they do


class FakeApi:
    """A stand-in for one api process: records what reaches it; answers events as an
    unfinished stream (the rest once ``release`` is set), ``/readyz`` with
    ``readyz_status``, and everything else with ``status``."""

    def __init__(self, status: int = 200, readyz_status: int = 200) -> None:
        self.status = status
        self.readyz_status = readyz_status
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.release = threading.Event()
        self.server = FakeApiServer(self)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def hits(self, path: str | None = None) -> int:
        return sum(1 for _, p, _ in self.requests if path is None or p == path)

    def __enter__(self) -> FakeApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def fake_apis(*specs: tuple[int, int]) -> Iterator[list[FakeApi]]:
    """One started ``FakeApi`` per (status, readyz_status)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(FakeApi(status, ready)) for status, ready in specs]


@contextlib.contextmanager
def nginx_in_front(apis: list[FakeApi]) -> Iterator[str]:
    """The shipped nginx files, with the fakes' ports and a free port of its own substituted
    (nothing else changed): ``tests.support.nginx``."""
    with Nginx([api.port for api in apis], binary=tool("nginx")) as nginx:
        yield nginx.url


def render_haproxy(text: str, listen_port: int, api_ports: list[int]) -> str:
    """haproxy.cfg's ``text`` bound to ``listen_port`` of 127.0.0.1, its api servers one per
    port of ``api_ports``, each with the shipped lines' parameters."""
    block = haproxy_api_servers_block(text)
    shipped = re.findall(r"(?m)^(\s*)server \S+ \S+(.*)$", block.group(1))
    assert shipped, "haproxy.cfg lists no api server"
    indent, parameters = shipped[0]
    servers = "\n".join(
        f"{indent}server api-{n} 127.0.0.1:{port}{parameters}"
        for n, port in enumerate(api_ports, 1)
    )
    text = text[: block.start(1)] + servers + text[block.end(1) :]
    text, count = re.subn(r"(?m)^(\s*)bind :80$", rf"\1bind 127.0.0.1:{listen_port}", text)
    assert count == 1, "haproxy.cfg: no `bind :80` to substitute"
    return text


@contextlib.contextmanager
def haproxy_in_front(apis: list[FakeApi]) -> Iterator[str]:
    """The shipped haproxy.cfg, checked (``haproxy -c``: no warning either) and run, with the
    fakes' ports and a free port of its own substituted (nothing else changed)."""
    haproxy = tool("haproxy")
    workdir = Path(tempfile.mkdtemp(prefix="sb-haproxy-"))
    try:
        port = free_port()
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(render_haproxy(HAPROXY_CFG.read_text(), port, [api.port for api in apis]))
        checked = run([haproxy, "-c", "-f", str(cfg)])
        assert checked.returncode == 0, checked.stderr
        assert "[WARNING]" not in checked.stderr, checked.stderr
        args = [haproxy, "-db", "-f", str(cfg)]
        with ServerProcess(args, port, workdir / "haproxy.log", "haproxy") as server:
            yield server.url
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


Proxy = Callable[[list[FakeApi]], contextlib.AbstractContextManager[str]]
PROXIES = [pytest.param(nginx_in_front, id="nginx"), pytest.param(haproxy_in_front, id="haproxy")]
