"""The shipped deployment, started from the shipped files on loopback.

What ``infra/compose.yaml`` runs, without containers: nginx from ``infra/nginx/`` in front
of three ``streambroker api`` processes, two ``streambroker worker`` processes serving their
health port, and Redis from ``infra/sentinel/`` (a master, two replicas, three sentinels:
``tests.support.sentinel``). Only what must differ on one machine changes: nginx listens on
a free port of 127.0.0.1 and ``upstreams.inc`` names the apis' free ports, with the shipped
file's own server parameters (``max_fails``, ``fail_timeout``): ``tests.support.nginx``.

An api keeps its port across a restart (``restart_api``): nginx knows the apis by address,
as a deployment's load balancer does.
"""

from __future__ import annotations

from contextlib import ExitStack

from tests.support.nginx import Nginx
from tests.support.processes import BrokerProcess, wait_ready
from tests.support.redis_server import free_port
from tests.support.sentinel import SentinelSet

#: What the apis are started with, beyond the store: a short heartbeat (readers notice a
#: dead api quickly) and the drain an orchestrator would give them.
API_ENV = {"BROKER_HEARTBEAT_SECONDS": "0.5"}
DRAIN_SECONDS = 1.0


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
