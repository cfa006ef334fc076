"""The processes of a test Redis Cluster (``tests.support.cluster``): one ``redis-server`` per
node, started from a copy of the shipped ``infra/cluster/node.conf``.

Only what must differ between nodes on one machine is changed, on the command line: the port,
the data directory, the log file, the ``nodes.conf`` and the cluster bus port (Redis's
default, port+10000, may be taken, or past 65535, for a free port).

Without redis-server or redis-cli a cluster test is skipped, except under ``CI=true``, where
it fails (as ``tests.support.redis_server.start_or_fail``).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import redis

from tests.support.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "infra" / "cluster" / "node.conf"
HOST = "127.0.0.1"


def node_timeout_ms() -> int:
    """The shipped ``cluster-node-timeout``: what failover times are measured against."""
    found = re.search(r"^cluster-node-timeout (\d+)$", SHIPPED.read_text(), flags=re.M)
    assert found is not None, f"{SHIPPED} sets no cluster-node-timeout"
    return int(found.group(1))


def binary_or_fail(name: str) -> str:
    """The path of ``name``; without it, skip locally but fail under CI (``start_or_fail``)."""
    binary = shutil.which(name)
    if binary is None:
        message = f"{name} is not installed (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message + "; real-Redis tests must not be skipped under CI")
        pytest.skip(message)
    return binary


def node_client(port: int) -> redis.Redis:
    """A plain client of one node: what it says itself, without a cluster client's
    redirections."""
    return redis.Redis(host=HOST, port=port, decode_responses=True, socket_timeout=2)


class ClusterNodeServer(RedisServer):
    """A ``RedisServer`` that is a cluster node: its bus on a free port of its own, its
    ``nodes.conf`` in its own data directory (kept by ``kill()``, for a restart)."""

    def __init__(self, binary: str, *, config: Path) -> None:
        super().__init__(binary, config=config)
        # free_port() twice in a row may hand out the same port, as this node's is not bound
        # yet (the other nodes' are: they are started one after the other).
        self.bus_port = free_port()
        while self.bus_port == self.port:
            self.bus_port = free_port()
        self._args += [
            "--cluster-port",
            str(self.bus_port),
            "--cluster-config-file",
            str(self.dir / "nodes.conf"),
        ]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self) -> str:
        log = self.dir / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""
