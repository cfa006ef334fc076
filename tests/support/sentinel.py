"""A Redis behind Sentinel for tests, from the configuration the project ships.

``SentinelSet``: a master and two replicas (``infra/sentinel/master.conf`` and
``replica.conf``) and three sentinels (``infra/sentinel/sentinel.conf``), each on a free
port of 127.0.0.1 with a copy of its file in a temp dir (Redis and Sentinel rewrite their
files on a failover). Only what must differ is changed: the port (on the command line),
the master a replica starts from, the master the sentinels watch, and, when a test asks, the
sentinels' ``down-after-milliseconds``. Everything is stopped and removed on ``stop()``.

Faults: ``failover()`` (``SENTINEL FAILOVER``), ``kill_master()`` (``kill -9``), and
``restart(port)`` for a node killed before: it comes back on its port, from its own
config file (as Sentinel last rewrote it) and data directory (its AOF), as the node it was
when it died; Sentinel then reconfigures it. ``wait_settled()`` waits for the set to be
whole again (every live node a replica of the master, in sync, the sentinels agreeing).

Without redis-server the test is skipped, except under ``CI=true``, where it fails
(``tests.support.redis_server.start_or_fail``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.support.background import Background
from tests.support.redis_server import (
    RedisServer,
    free_port,
    start_or_fail,
    stop_process,
    stop_processes,
)
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "infra" / "sentinel"
#: The service name the shipped sentinel.conf monitors the master under.
SERVICE = "streambroker"
REPLICAS = 2
SENTINELS = 3


class SentinelProcess:
    """One ``redis-server <copy of sentinel.conf> --sentinel`` on a free port."""

    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        self.port = free_port()
        self.config = config
        self.log = workdir / f"sentinel-{self.port}.log"
        self._args = [
            binary,
            str(config),
            "--sentinel",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--logfile",
            str(self.log),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self._args, stdout=subprocess.DEVNULL)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=2)

    def alive(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"sentinel on port {self.port} exited: {tail}")
        return True

    def stop(self) -> None:
        stop_process(self.process)


class SentinelSet(Background):
    """Master + two replicas + three sentinels; ``url`` is the broker's ``REDIS_URL``."""

    def __init__(self, *, down_after_ms: int | None = None) -> None:
        """``down_after_ms``: the sentinels' ``down-after-milliseconds`` instead of the
        shipped value."""
        self.down_after_ms = down_after_ms
        self.dir = Path(tempfile.mkdtemp(prefix="sb-sentinel-"))
        self.nodes: dict[int, RedisServer] = {}  # by port
        self.sentinels: list[SentinelProcess] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        try:
            master = self._data_node("master.conf", master_port=None)
            for _ in range(REPLICAS):
                self._data_node("replica.conf", master_port=master.port)
            eventually(
                lambda: self._online_replicas(master.port) == REPLICAS,
                what="the replicas to be in sync with the master",
            )
            binary = shutil.which("redis-server")
            assert binary is not None  # start_or_fail found it
            for _ in range(SENTINELS):
                self._sentinel(binary, master.port)
            eventually(self._sentinels_agree, what=self.describe)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_processes(
            [sentinel.process for sentinel in self.sentinels]
            + [node.process for node in self.nodes.values()]
        )
        for node in self.nodes.values():
            node.stop()  # its data directory
        shutil.rmtree(self.dir, ignore_errors=True)

    def _data_node(self, shipped: str, *, master_port: int | None) -> RedisServer:
        text = (SHIPPED / shipped).read_text()
        if master_port is not None:
            text, count = re.subn(
                r"^replicaof .*$", f"replicaof 127.0.0.1 {master_port}", text, flags=re.M
            )
            assert count == 1, f"{shipped} has no replicaof line"
        config = self.dir / f"{shipped.removesuffix('.conf')}-{len(self.nodes)}.conf"
        config.write_text(text)
        node = start_or_fail(config=config)
        self.nodes[node.port] = node
        return node

    def _sentinel(self, binary: str, master_port: int) -> None:
        text, count = re.subn(
            rf"^sentinel monitor {SERVICE} \S+ \d+ (\d+)$",
            rf"sentinel monitor {SERVICE} 127.0.0.1 {master_port} \1",
            (SHIPPED / "sentinel.conf").read_text(),
            flags=re.M,
        )
        assert count == 1, "sentinel.conf monitors no master named " + SERVICE
        if self.down_after_ms is not None:
            text = re.sub(
                rf"^sentinel down-after-milliseconds {SERVICE} \d+$",
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
                text,
                flags=re.M,
            )
        config = self.dir / f"sentinel-{len(self.sentinels)}.conf"
        config.write_text(text)
        sentinel = SentinelProcess(binary, config, self.dir)
        self.sentinels.append(sentinel)
        sentinel.start()

    # -- what the set looks like ---------------------------------------------------------

    def master_port(self) -> int:
        """The master's port, as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    _, port = client.sentinel_get_master_addr_by_name(SERVICE)
                    return int(port)
            except (redis.RedisError, TypeError):
                continue
        raise AssertionError("no sentinel names a master")

    def role(self, port: int) -> str:
        with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as client:
            return str(client.execute_command("ROLE")[0])

    def _online_replicas(self, master_port: int) -> int:
        with redis.Redis(port=master_port, decode_responses=True, socket_timeout=2) as client:
            info = client.info("replication")
        return sum(
            1
            for key, value in info.items()
            if key.startswith("slave") and isinstance(value, dict) and value["state"] == "online"
        )

    def _sentinels_agree(self) -> bool:
        """Every live sentinel sees the master up, its replicas and the other sentinels."""
        live = [s for s in self.sentinels if s.process and s.process.poll() is None]
        for sentinel in live:
            sentinel.alive()
            try:
                with sentinel.client() as client:
                    state = client.sentinel_master(SERVICE)
            except redis.RedisError:
                return False
            if (
                not state["is_master"]
                or state["is_sdown"]
                or state["num-slaves"] < len(self.nodes) - 1
                or state["num-other-sentinels"] != len(live) - 1
            ):
                return False
        return True

    def describe(self) -> str:
        lines = [f"sentinels of {self.url}:"]
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    state = client.sentinel_master(SERVICE)
                lines.append(f"  {sentinel.port}: {state}")
            except redis.RedisError as exc:
                lines.append(f"  {sentinel.port}: {exc}")
        return "\n".join(lines)

    # -- faults ----------------------------------------------------------------------------

    def failover(self) -> int:
        """``SENTINEL FAILOVER``: a replica is promoted (no agreement needed), the master
        demoted. Returns the old master's port."""
        old = self.master_port()
        with self.sentinels[0].client() as client:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE)
        return old

    def kill_master(self) -> int:
        """SIGKILL the master (a crash: the sentinels must notice and agree). Returns its
        port; the node stays dead."""
        old = self.master_port()
        self.nodes[old].kill()
        return old

    def restart(self, port: int) -> None:
        """Start a node killed before (``kill_master``) again: same port, config file and
        data directory. A master when it died starts as one, with what its AOF holds, until
        Sentinel demotes it (``wait_settled``)."""
        node = self.nodes[port]
        assert node.process is not None
        assert node.process.poll() is not None, f"node {port} is still running"
        node.start()

    def live_ports(self) -> list[int]:
        return [p for p, n in self.nodes.items() if n.process and n.process.poll() is None]

    def settled(self) -> bool:
        """Every sentinel names the same master, which says it is one and has every other
        live node as a replica in sync (``online``), and the sentinels agree on the rest."""
        try:
            masters = set()
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    masters.add(int(client.sentinel_get_master_addr_by_name(SERVICE)[1]))
            if len(masters) != 1:
                return False
            master = masters.pop()
            others = [p for p in self.live_ports() if p != master]
            return (
                self.role(master) == "master"
                and all(self._follows(port, master) for port in others)
                and self._online_replicas(master) == len(others)
                and self._sentinels_agree()
            )
        except (redis.RedisError, TypeError):
            return False

    def _follows(self, port: int, master: int) -> bool:
        with redis.Redis(port=port, decode_responses=True, socket_timeout=2) as client:
            info = client.info("replication")
        return (
            info["role"] == "slave"
            and int(info["master_port"]) == master
            and info["master_link_status"] == "up"
        )

    def wait_settled(self, timeout: float = 40) -> float:
        """Until ``settled()``; the seconds it took."""
        start = time.monotonic()
        eventually(self.settled, timeout=timeout, interval=0.1, what=self.describe)
        return time.monotonic() - start

    def wait_for_new_master(self, old_port: int, timeout: float = 30) -> int:
        """Until every live sentinel names a master other than ``old_port`` and that node
        says it is one; its port."""

        def switched() -> int:
            try:
                ports = set()
                for sentinel in self.sentinels:
                    with sentinel.client() as client:
                        _, port = client.sentinel_get_master_addr_by_name(SERVICE)
                    ports.add(int(port))
                if len(ports) != 1 or old_port in ports:
                    return 0
                port = ports.pop()
                return port if self.role(port) == "master" else 0
            except redis.RedisError:
                return 0  # a sentinel or the node is busy with the failover: not yet

        return eventually(switched, timeout=timeout, interval=0.05, what=self.describe)
