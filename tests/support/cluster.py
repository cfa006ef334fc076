"""A Redis Cluster for tests, from the configuration the project ships.

``RedisClusterSet``: ``masters`` masters with ``replicas_per_master`` replicas each, every
node a ``redis-server`` on free ports of 127.0.0.1 started from a copy of
``infra/cluster/node.conf`` in a temp dir, and joined with ``redis-cli --cluster create``,
as an operator would (``infra/cluster/README.md``). Only what must differ between nodes on
one machine is changed, on the command line: the port, the data directory, the log file,
the ``nodes.conf`` and the cluster bus port (Redis's default, port+10000, may be taken, or
past 65535, for a free port). ``url`` is the broker's ``REDIS_URL`` for it
(``redis+cluster://`` and the masters as seeds). Everything is stopped and removed on
``stop()``.

Why real processes: what a broker must survive on a cluster is the cluster's own doing
(slot ownership moving on a failover, ``MOVED`` answers, ``CLUSTERDOWN`` while a master is
being replaced), which no fake reproduces.

Faults: ``failover()`` (``CLUSTER FAILOVER`` on a replica: a planned, lossless switch),
``kill_master()`` (``kill -9``: the replicas must notice and elect one), and
``restart(port)`` for a node killed before: it comes back on its ports, from its own
``nodes.conf`` and append-only file, as the master it was; the cluster then turns it into a
replica of the node promoted in its place. ``wait_settled()`` waits for the cluster to be
whole again (every live node ``cluster_state:ok``, all agreeing on who owns which slot and
who replicates whom, every replica in sync).

Without redis-server or redis-cli the test is skipped, except under ``CI=true``, where it
fails (as ``tests.support.redis_server.start_or_fail``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterNode, RedisCluster

from tests.support.background import Background
from tests.support.redis_server import RedisServer, free_port
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "infra" / "cluster" / "node.conf"
HOST = "127.0.0.1"
SLOTS = 16384


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


@dataclass(frozen=True)
class Topology:
    """The cluster as one node sees it, in ports: who owns which slots, and, for the live
    nodes, whom each replicates (``None``: a master). Two nodes agree when theirs are equal."""

    #: (first slot, last slot, port of the master owning them), sorted.
    slots: tuple[tuple[int, int, int], ...]
    #: (port, port of its master or None), for every live node, sorted.
    roles: tuple[tuple[int, int | None], ...]

    def owner(self, slot: int) -> int | None:
        for first, last, port in self.slots:
            if first <= slot <= last:
                return port
        return None

    def masters(self) -> list[int]:
        """The masters that own slots."""
        return sorted({port for _, _, port in self.slots})

    def replicas_of(self, master_port: int) -> list[int]:
        return sorted(port for port, master in self.roles if master == master_port)

    def covered(self) -> int:
        return sum(last - first + 1 for first, last, _ in self.slots)


def port_of(address: str) -> int:
    """The client port in a ``CLUSTER NODES`` address, ``ip:port@busport[,hostname]``."""
    return int(address.split("@")[0].rsplit(":", 1)[1])


def parse_nodes(text: str, live: set[int]) -> Topology:
    """``CLUSTER NODES`` of one node as a ``Topology`` (``live``: the ports whose roles
    count; a dead node's own view of itself is nobody's concern)."""
    ports: dict[str, int] = {}
    rows: list[list[str]] = []
    for line in text.strip().splitlines():
        fields = line.split()
        # <id> <ip:port@cport[,hostname]> <flags> <master id or -> <ping> <pong> <epoch>
        # <link> <slot or first-last>... ([slot->-id] entries are migrations: not owned)
        ports[fields[0]] = port_of(fields[1])
        rows.append(fields)
    slots: list[tuple[int, int, int]] = []
    roles: list[tuple[int, int | None]] = []
    for fields in rows:
        port = ports[fields[0]]
        flags = set(fields[2].split(","))
        for entry in fields[8:]:
            if not entry.startswith("["):
                first, _, last = entry.partition("-")
                slots.append((int(first), int(last or first), port))
        if port in live:
            master = None if "master" in flags else ports.get(fields[3], -1)
            roles.append((port, master))
    return Topology(tuple(sorted(slots)), tuple(sorted(roles)))


class RedisClusterSet(Background):
    """A Redis Cluster of real processes; ``url`` is the broker's ``REDIS_URL``."""

    def __init__(self, *, masters: int = 3, replicas_per_master: int = 0) -> None:
        # redis-cli --cluster create refuses fewer than 3 masters (a majority of masters must
        # survive any one's loss to elect its replacement); one master alone, given every
        # slot, is a cluster too, without failover (what a benchmark compares against).
        assert masters >= 3 or (masters == 1 and not replicas_per_master), (
            "a Redis Cluster needs 3 masters, or one alone without replicas"
        )
        self.master_count = masters
        self.replicas_per_master = replicas_per_master
        self.dir = Path(tempfile.mkdtemp(prefix="sb-cluster-"))
        self.nodes: dict[int, ClusterNodeServer] = {}  # by port
        self.killed: set[int] = set()
        self._seeds: list[int] = []

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """The masters the cluster was created with: what an operator puts in
        ``REDIS_URL``, so it stays as it was through failovers."""
        return [(HOST, port) for port in self._seeds]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in self.seeds)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        try:
            server = binary_or_fail("redis-server")
            cli = binary_or_fail("redis-cli")
            for index in range(self.master_count * (1 + self.replicas_per_master)):
                self._node(server, index)
            self._create(cli)
            eventually(self._formed, timeout=30, interval=0.05, what=self.describe)
            self._seeds = self.masters()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _node(self, binary: str, index: int) -> None:
        # A copy per node, as an operator ships one per machine: nothing a test does to a
        # node (CONFIG REWRITE) may reach the shipped file or another node.
        config = self.dir / f"node-{index}.conf"
        shutil.copyfile(SHIPPED, config)
        node = ClusterNodeServer(binary, config=config)
        self.nodes[node.port] = node
        node.start()

    def _create(self, cli: str) -> None:
        """``redis-cli --cluster create``: slots spread evenly over the first nodes, the rest
        made their replicas (which replica goes with which master is redis-cli's choice:
        read it from the cluster, never from the order here). One master alone is given
        every slot, which redis-cli will not do."""
        if self.master_count == 1:
            (port,) = self.nodes
            with self._client(port) as node:
                node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, SLOTS - 1)
            return
        addresses = [f"{HOST}:{port}" for port in self.nodes]
        replicas = str(self.replicas_per_master)
        created = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                replicas,
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({created.returncode}):\n"
                f"{created.stdout[-3000:]}\n{created.stderr[-2000:]}"
            )

    def _formed(self) -> bool:
        """Settled, with every master the set was asked for and all their replicas."""
        if not self.settled():
            return False
        topology = self.topology()
        return len(topology.masters()) == self.master_count and all(
            len(topology.replicas_of(port)) == self.replicas_per_master
            for port in topology.masters()
        )

    # -- what the cluster looks like -------------------------------------------------------

    def live_ports(self) -> list[int]:
        """The nodes not killed on purpose. One that died by itself fails the test, with its
        log: waiting for it would only time out."""
        live = [port for port in self.nodes if port not in self.killed]
        for port in live:
            node = self.nodes[port]
            if not node.running:
                raise RuntimeError(f"cluster node {port} exited: {node.log_tail()}")
        return live

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(host=HOST, port=port, decode_responses=True, socket_timeout=2)

    def _view(self, port: int, live: set[int]) -> Topology:
        with self._client(port) as node:
            return parse_nodes(str(node.execute_command("CLUSTER", "NODES")), live)

    def _state(self, port: int) -> str:
        with self._client(port) as node:
            info = str(node.execute_command("CLUSTER", "INFO"))
        found = re.search(r"^cluster_state:(\w+)", info, flags=re.M)
        return found.group(1) if found else "?"

    def _agreed(self) -> Topology | None:
        """The topology every live node reports, or None while they differ (or one does
        not answer: it is busy restarting or failing over)."""
        live = set(self.live_ports())
        try:
            views = {self._view(port, live) for port in live}
        except redis.RedisError:
            return None
        return views.pop() if len(views) == 1 else None

    def topology(self, timeout: float = 10) -> Topology:
        """The topology once the live nodes agree on it (they differ for a moment after any
        change, while the news spreads)."""
        agreed = eventually(self._agreed, timeout=timeout, interval=0.05, what=self.describe)
        assert agreed is not None  # eventually() returns only a truthy value
        return agreed

    def masters(self) -> list[int]:
        """Ports of the masters that own slots and are alive, as the cluster agrees."""
        live = set(self.live_ports())
        return [port for port in self.topology().masters() if port in live]

    def replicas_of(self, master_port: int) -> list[int]:
        """Ports of the live replicas of ``master_port``, as the cluster agrees."""
        return self.topology().replicas_of(master_port)

    def slot_of(self, key: str) -> int:
        with self._client(self.live_ports()[0]) as node:
            return int(node.execute_command("CLUSTER", "KEYSLOT", key))

    def owner_of(self, key: str) -> int:
        """Port of the master that owns ``key``'s slot."""
        slot = self.slot_of(key)
        owner = self.topology().owner(slot)
        assert owner is not None, f"nobody owns slot {slot}:\n{self.describe()}"
        return owner

    def client(self) -> RedisCluster:
        """A cluster client (redis-py follows ``MOVED`` itself), from every live node."""
        seeds = [ClusterNode(HOST, port) for port in self.live_ports()]  # type: ignore[no-untyped-call]
        client: RedisCluster = RedisCluster(
            startup_nodes=seeds, decode_responses=True, socket_timeout=2
        )
        return client

    def settled(self) -> bool:
        """Every live node says ``cluster_state:ok`` and reports the same topology, all
        16384 slots owned by live masters, no live node flagged as failing by another, and
        every replica's link to its master up."""
        topology = self._agreed()
        if topology is None:
            return False
        live = set(self.live_ports())
        try:
            return (
                topology.covered() == SLOTS
                and set(topology.masters()) <= live
                and all(self._state(port) == "ok" for port in live)
                and not any(self._flags_failing(port, live) for port in live)
                and all(self._in_sync(port) for port, master in topology.roles if master)
            )
        except redis.RedisError:
            return False

    def _flags_failing(self, port: int, live: set[int]) -> bool:
        """Whether ``port`` still suspects (``fail?``) or marks (``fail``) a live node: after
        a restart its FAIL flag is cleared only once the others hear from it."""
        with self._client(port) as node:
            text = str(node.execute_command("CLUSTER", "NODES"))
        for line in text.strip().splitlines():
            fields = line.split()
            if port_of(fields[1]) in live and {"fail", "fail?"} & set(fields[2].split(",")):
                return True
        return False

    def _in_sync(self, port: int) -> bool:
        with self._client(port) as node:
            info: dict[str, Any] = node.info("replication")
        return info.get("master_link_status") == "up"

    def wait_settled(self, timeout: float = 30) -> float:
        """Until ``settled()``; the seconds it took."""
        start = time.monotonic()
        eventually(self.settled, timeout=timeout, interval=0.05, what=self.describe)
        return time.monotonic() - start

    def describe(self) -> str:
        """Every node's state and ``CLUSTER NODES``: what a failed wait shows."""
        lines = [f"cluster {self.url if self._seeds else '(being created)'}:"]
        for port, node in self.nodes.items():
            if not node.running:
                lines.append(f"  {port}: not running")
                continue
            try:
                with self._client(port) as client:
                    nodes = str(client.execute_command("CLUSTER", "NODES")).strip()
                lines.append(f"  {port}: cluster_state:{self._state(port)}")
                lines.extend(f"    {line}" for line in nodes.splitlines())
            except redis.RedisError as exc:
                lines.append(f"  {port}: {exc}")
        return "\n".join(lines)

    # -- faults ----------------------------------------------------------------------------

    def failover(self, master_port: int, timeout: float = 20) -> int:
        """``CLUSTER FAILOVER`` on a replica of ``master_port``: the master stops taking
        writes, the replica catches up with it and is elected, the old master follows it.
        Returns the new master's port once every live node agrees it owns the slots."""
        replicas = self.replicas_of(master_port)
        assert replicas, f"{master_port} has no replica to fail over to:\n{self.describe()}"
        chosen = replicas[0]
        slots = self._slots_of(master_port)
        with self._client(chosen) as replica:
            replica.execute_command("CLUSTER", "FAILOVER")
        return self._wait_replaced(slots, {chosen}, timeout)

    def kill_master(self, master_port: int, timeout: float = 20) -> int:
        """SIGKILL ``master_port`` (a crash: the others must notice and elect one of its
        replicas). Returns the promoted replica's port once every live node agrees it owns
        the slots; the killed node stays dead until ``restart()``."""
        assert master_port in self.masters(), f"{master_port} is not a master"
        replicas = set(self.replicas_of(master_port))
        assert replicas, f"{master_port} has no replica to promote:\n{self.describe()}"
        slots = self._slots_of(master_port)
        self.nodes[master_port].kill()
        self.killed.add(master_port)
        return self._wait_replaced(slots, replicas, timeout)

    def _slots_of(self, master_port: int) -> list[tuple[int, int]]:
        return [(first, last) for first, last, port in self.topology().slots if port == master_port]

    def _wait_replaced(
        self, slots: list[tuple[int, int]], candidates: set[int], timeout: float
    ) -> int:
        """Until every live node says ``cluster_state:ok`` and agrees that one of
        ``candidates`` owns ``slots``; its port."""
        assert slots, "the master owns no slots"

        def replaced() -> int:
            topology = self._agreed()
            if topology is None:
                return 0
            owners = {topology.owner(first) for first, _ in slots}
            if len(owners) != 1 or not owners <= candidates:
                return 0
            try:
                if any(self._state(port) != "ok" for port in self.live_ports()):
                    return 0
            except redis.RedisError:
                return 0
            return owners.pop() or 0

        return eventually(replaced, timeout=timeout, interval=0.02, what=self.describe)

    def move_slot(self, slot: int, to_port: int) -> None:
        """Reshard one slot to the master at ``to_port``, keys and all, the way
        ``redis-cli --cluster reshard`` does: ``IMPORTING`` on the new owner, ``MIGRATING``
        on the old, ``MIGRATE`` the keys, then every master told the new owner."""
        from_port = self.owner(slot)
        assert from_port is not None
        assert from_port != to_port
        with self._client(from_port) as source, self._client(to_port) as target:
            source_id = source.execute_command("CLUSTER", "MYID")
            target_id = target.execute_command("CLUSTER", "MYID")
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while names := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                source.execute_command("MIGRATE", HOST, to_port, "", 0, 5000, "KEYS", *names)
        for port in self.masters():
            with self._client(port) as node:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        eventually(lambda: self.owner(slot) == to_port, timeout=10, what=self.describe)

    def owner(self, slot: int) -> int | None:
        return self.topology().owner(slot)

    def restart(self, port: int) -> None:
        """Start a node killed before again: same ports, ``nodes.conf`` and append-only file.
        A master when it died comes back as one, with its old slots, until the cluster
        tells it that a replica now owns them and it becomes that replica's replica
        (``wait_settled``)."""
        node = self.nodes[port]
        assert not node.running, f"node {port} is still running"
        node.start()
        self.killed.discard(port)


class ControlSlotFaults:
    """The faults of ``tests.support.failover`` (written for a Sentinel set), each aimed at
    the master that serves the control slot (``broker.keys``: the job queue, the listing
    and lease indexes) at the time, which also serves a third of the generations: the
    shard whose loss touches every create and every worker."""

    #: How ``tests.support.failover`` reports each fault.
    titles = {
        "failover": "CLUSTER FAILOVER of the control slot's shard",
        "kill": "kill -9 of the control slot's master",
        "restart": "the killed master restarted",
    }

    def __init__(self, cluster: RedisClusterSet) -> None:
        self.cluster = cluster
        self.new_master: int | None = None

    def _target(self) -> int:
        return self.cluster.owner_of("sb:{control}:queue")

    def failover(self) -> int:
        old = self._target()
        self.new_master = self.cluster.failover(old)
        return old

    def kill_master(self) -> int:
        old = self._target()
        self.new_master = self.cluster.kill_master(old)
        return old

    def wait_for_new_master(self, old_port: int) -> int:
        # ``failover`` and ``kill_master`` return once the cluster agrees on the new one.
        assert self.new_master is not None
        assert self.new_master != old_port
        return self.new_master

    def restart(self, port: int) -> None:
        self.cluster.restart(port)

    def wait_settled(self) -> float:
        return self.cluster.wait_settled()


@contextmanager
def running_cluster(**kwargs: int) -> Iterator[RedisClusterSet]:
    """A started ``RedisClusterSet(**kwargs)``, stopped and removed on exit."""
    with RedisClusterSet(**kwargs) as cluster:
        yield cluster


@asynccontextmanager
async def broker_client(cluster: RedisClusterSet) -> AsyncIterator[AsyncRedisCluster]:
    """The cluster client the broker's processes use (``broker.cluster_connections``), on
    ``cluster``; closed on exit."""
    from broker.cluster_connections import cluster_client
    from broker.store_url import parse_store_url

    seeds = parse_store_url(cluster.url).cluster
    assert seeds is not None
    client = cluster_client(seeds, client_name="streambroker-t")
    try:
        yield client
    finally:
        await client.aclose()
