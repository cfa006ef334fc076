"""The shipped deployment, started from the shipped files on loopback.

What ``infra/compose.yaml`` runs, without containers: nginx from ``infra/nginx/`` in front
of three ``streambroker api`` processes, two ``streambroker worker`` processes serving their
health port, and Redis from ``infra/sentinel/`` (a master, two replicas, three sentinels:
``tests.support.sentinel``). Only what must differ on one machine changes: nginx listens on
a free port of 127.0.0.1 and ``upstreams.inc`` names the apis' free ports, with the shipped
file's own server parameters (``max_fails``, ``fail_timeout``).

An api keeps its port across a restart (``restart_api``): nginx knows the apis by address,
as a deployment's load balancer does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path

import httpx

from tests.support.processes import ROOT, BrokerProcess, wait_ready
from tests.support.redis_server import free_port
from tests.support.sentinel import SentinelSet
from tests.support.waiting import eventually

SHIPPED_NGINX = ROOT / "infra" / "nginx"
#: What the apis are started with, beyond the store: a short heartbeat (readers notice a
#: dead api quickly) and the drain an orchestrator would give them.
API_ENV = {"BROKER_HEARTBEAT_SECONDS": "0.5"}
DRAIN_SECONDS = 1.0


def nginx_binary() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is not installed (apt-get install nginx); .ci/run installs it")
    return binary


def render_nginx(into: Path, listen_port: int, api_ports: list[int]) -> Path:
    """A copy of ``infra/nginx`` in ``into`` that listens on ``listen_port`` of 127.0.0.1 and
    proxies to ``api_ports``; the path of its ``nginx.conf``."""
    for shipped in SHIPPED_NGINX.iterdir():
        shutil.copy(shipped, into / shipped.name)
    conf = into / "streambroker.conf"
    text, listens = re.subn(
        r"^(\s*)listen\s+[^;]+;",
        rf"\1listen 127.0.0.1:{listen_port};",
        conf.read_text(),
        flags=re.M,
    )
    assert listens == 1, "streambroker.conf should have one listen line"
    conf.write_text(text)
    upstreams = into / "upstreams.inc"
    shipped_servers = re.findall(r"^server\s+\S+\s*([^;]*);", upstreams.read_text(), flags=re.M)
    assert shipped_servers, "upstreams.inc should list server lines"
    parameters = shipped_servers[0]
    upstreams.write_text("".join(f"server 127.0.0.1:{port} {parameters};\n" for port in api_ports))
    return into / "nginx.conf"


class Nginx:
    """nginx in the foreground on a rendered copy of the shipped files."""

    def __init__(self, api_ports: list[int]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sb-nginx-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = render_nginx(self.dir, self.port, api_ports)
        self.log = self.dir / "nginx.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [nginx_binary(), "-c", str(self.conf), "-p", str(self.dir), "-g", "daemon off;"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        eventually(self._answers, timeout=10, interval=0.05, what=self.output)
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.output()}")
        try:
            httpx.get(f"{self.url}/healthz", timeout=1)
        except httpx.TransportError:
            return False
        return True

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class Topology:
    """Redis (Sentinel), 3 apis, 2 workers with health ports, nginx; stopped on ``close``."""

    def __init__(self, *, apis: int = 3, workers: int = 2) -> None:
        self._stack = ExitStack()
        try:
            self.sentinels = self._stack.enter_context(SentinelSet())
            self.api_ports = [free_port() for _ in range(apis)]
            self.apis: list[BrokerProcess] = [self._start_api(port) for port in self.api_ports]
            self.worker_ports = [free_port() for _ in range(workers)]
            self.workers = [self._start_worker(port) for port in self.worker_ports]
            self.nginx = Nginx(self.api_ports).start()
            self._stack.callback(self.nginx.stop)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """Where clients go: nginx."""
        return self.nginx.url

    def _start_api(self, port: int) -> BrokerProcess:
        api = BrokerProcess(
            "api",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--drain-seconds",
            str(DRAIN_SECONDS),
            env={"REDIS_URL": self.sentinels.url, **API_ENV},
            name=f"api-{port}",
        ).start()
        self._stack.callback(api.stop)
        wait_ready(f"http://127.0.0.1:{port}", check=api._check_alive, describe=api.output)
        return api

    def _start_worker(self, port: int) -> BrokerProcess:
        worker = BrokerProcess(
            "worker",
            env={"REDIS_URL": self.sentinels.url, "BROKER_METRICS_PORT": str(port)},
            name=f"worker-{port}",
        ).start()
        self._stack.callback(worker.stop)
        wait_ready(f"http://127.0.0.1:{port}", check=worker._check_alive, describe=worker.output)
        return worker

    def restart_api(self, index: int) -> BrokerProcess:
        """Start api ``index`` again on its port (after it was stopped or killed)."""
        self.apis[index] = self._start_api(self.api_ports[index])
        return self.apis[index]

    def close(self) -> None:
        self._stack.close()
