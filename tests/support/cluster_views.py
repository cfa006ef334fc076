"""What a test Redis Cluster (``tests.support.cluster``) looks like, as its nodes say: who owns
which slot, who replicates whom, whether it is whole.

``Topology`` is one node's ``CLUSTER NODES`` in ports; ``ClusterViews`` asks every live node
for its own and answers only once they agree (they differ for a moment after any change,
while the news spreads). ``settled()`` is the cluster whole: every live node
``cluster_state:ok``, all agreeing on who owns which slot and who replicates whom, every
replica in sync.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

from tests.support.cluster_nodes import HOST, ClusterNodeServer, node_client
from tests.support.waiting import eventually

SLOTS = 16384


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


class ClusterViews:
    """The views of a cluster's nodes (``nodes``, by port), the ones in ``killed`` (dead, or
    stopped, on purpose) left out; ``RedisClusterSet`` starts the nodes and breaks them."""

    def __init__(self) -> None:
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

    def live_ports(self) -> list[int]:
        """The nodes not killed on purpose. One that died by itself fails the test, with its
        log: waiting for it would only time out."""
        live = [port for port in self.nodes if port not in self.killed]
        for port in live:
            node = self.nodes[port]
            if not node.running:
                raise RuntimeError(f"cluster node {port} exited: {node.log_tail()}")
        return live

    def _view(self, port: int, live: set[int]) -> Topology:
        with node_client(port) as node:
            return parse_nodes(str(node.execute_command("CLUSTER", "NODES")), live)

    def _state(self, port: int) -> str:
        with node_client(port) as node:
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
        """The topology once the live nodes agree on it."""
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
        with node_client(self.live_ports()[0]) as node:
            return int(node.execute_command("CLUSTER", "KEYSLOT", key))

    def owner(self, slot: int) -> int | None:
        return self.topology().owner(slot)

    def owner_of(self, key: str) -> int:
        """Port of the master that owns ``key``'s slot."""
        slot = self.slot_of(key)
        owner = self.owner(slot)
        assert owner is not None, f"nobody owns slot {slot}:\n{self.describe()}"
        return owner

    def slots_of(self, master_port: int) -> list[tuple[int, int]]:
        """The (first, last) slot ranges ``master_port`` owns, as the cluster agrees."""
        return [(first, last) for first, last, port in self.topology().slots if port == master_port]

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
        with node_client(port) as node:
            text = str(node.execute_command("CLUSTER", "NODES"))
        for line in text.strip().splitlines():
            fields = line.split()
            if port_of(fields[1]) in live and {"fail", "fail?"} & set(fields[2].split(",")):
                return True
        return False

    def _in_sync(self, port: int) -> bool:
        with node_client(port) as node:
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
                with node_client(port) as client:
                    nodes = str(client.execute_command("CLUSTER", "NODES")).strip()
                lines.append(f"  {port}: cluster_state:{self._state(port)}")
                lines.extend(f"    {line}" for line in nodes.splitlines())
            except redis.RedisError as exc:
                lines.append(f"  {port}: {exc}")
        return "\n".join(lines)
