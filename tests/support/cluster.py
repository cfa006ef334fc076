"""A Redis Cluster for tests, from the configuration the project ships.

``RedisClusterSet``: ``masters`` masters with ``replicas_per_master`` replicas each, every
node a ``redis-server`` on free ports of 127.0.0.1 (``tests.support.cluster_nodes``), joined
with ``redis-cli --cluster create``, as an operator would (``infra/cluster/README.md``).
``url`` is the broker's ``REDIS_URL`` for it (``redis+cluster://`` and the masters as seeds).
What it looks like (who owns which slot, whether it is whole) is
``tests.support.cluster_views``. Everything is stopped and removed on ``stop()``.

Why real processes: what a broker must survive on a cluster is the cluster's own doing
(slot ownership moving on a failover, ``MOVED`` answers, ``CLUSTERDOWN`` while a master is
being replaced), which no fake reproduces.

Faults: ``failover()`` (``CLUSTER FAILOVER`` on a replica: a planned, lossless switch),
``kill_master()`` (``kill -9``: the replicas must notice and elect one), ``frozen(port)``
(SIGSTOP until the block ends: a hung host), and ``restart(port)`` for a node killed before:
it comes back on its ports, from its own ``nodes.conf`` and append-only file, as the master
it was; the cluster then turns it into a replica of the node promoted in its place.
``wait_settled()`` waits for the cluster to be whole again.

Forming a cluster takes seconds, so consecutive tests share one (``shared_cluster``, the
``redis_cluster`` and ``replicated_cluster`` fixtures of ``tests/conftest.py``): each gets it
made whole again (``make_whole``: the nodes a test before it killed restarted, the cluster
settled in its first shape) and emptied.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from tests.support.background import Background
from tests.support.cluster_nodes import (
    HOST,
    SHIPPED,
    ClusterNodeServer,
    binary_or_fail,
    node_client,
)
from tests.support.cluster_views import SLOTS, ClusterViews
from tests.support.redis_server import stop_processes
from tests.support.shared import SHARED
from tests.support.waiting import eventually


class RedisClusterSet(ClusterViews, Background):
    """A Redis Cluster of real processes; ``url`` is the broker's ``REDIS_URL``."""

    def __init__(self, *, masters: int = 3, replicas_per_master: int = 0) -> None:
        # redis-cli --cluster create refuses fewer than 3 masters (a majority of masters must
        # survive any one's loss to elect its replacement); one master alone, given every
        # slot, is a cluster too, without failover (what a benchmark compares against).
        assert masters >= 3 or (masters == 1 and not replicas_per_master), (
            "a Redis Cluster needs 3 masters, or one alone without replicas"
        )
        super().__init__()
        self.master_count = masters
        self.replicas_per_master = replicas_per_master
        self.dir = Path(tempfile.mkdtemp(prefix="sb-cluster-"))

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
        stop_processes(node.process for node in self.nodes.values())
        for node in self.nodes.values():
            node.stop()  # its data directory
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
            with node_client(port) as node:
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

    def make_whole(self, timeout: float = 30) -> None:
        """What the next test that shares this cluster starts from: every node a test before
        killed started again, the cluster settled with as many masters and replicas as it was
        created with (a failover swaps which node is which), and every key gone."""
        for port in sorted(self.killed):
            self.restart(port)
        eventually(self._formed, timeout=timeout, interval=0.05, what=self.describe)
        for port in self.masters():
            with node_client(port) as node:
                node.flushall()

    # -- faults ----------------------------------------------------------------------------

    def failover(self, master_port: int, timeout: float = 20) -> int:
        """``CLUSTER FAILOVER`` on a replica of ``master_port``: the master stops taking
        writes, the replica catches up with it and is elected, the old master follows it.
        Returns the new master's port once every live node agrees it owns the slots."""
        replicas = self.replicas_of(master_port)
        assert replicas, f"{master_port} has no replica to fail over to:\n{self.describe()}"
        chosen = replicas[0]
        slots = self.slots_of(master_port)
        with node_client(chosen) as replica:
            replica.execute_command("CLUSTER", "FAILOVER")
        return self.wait_replaced(slots, {chosen}, timeout)

    def kill_master(self, master_port: int, timeout: float = 20) -> int:
        """SIGKILL ``master_port`` (a crash: the others must notice and elect one of its
        replicas). Returns the promoted replica's port once every live node agrees it owns
        the slots; the killed node stays dead until ``restart()``."""
        assert master_port in self.masters(), f"{master_port} is not a master"
        replicas = set(self.replicas_of(master_port))
        assert replicas, f"{master_port} has no replica to promote:\n{self.describe()}"
        slots = self.slots_of(master_port)
        self.nodes[master_port].kill()
        self.killed.add(master_port)
        return self.wait_replaced(slots, replicas, timeout)

    @contextmanager
    def frozen(self, port: int) -> Iterator[None]:
        """SIGSTOP the node at ``port`` for the block (a hung host, a partition that resets
        nothing: its sockets stay open and silent), SIGCONT after it. Meanwhile the views
        leave it out, as it answers nothing."""
        process = self.nodes[port].process
        assert process is not None
        os.kill(process.pid, signal.SIGSTOP)
        self.killed.add(port)
        try:
            yield
        finally:
            os.kill(process.pid, signal.SIGCONT)
            self.killed.discard(port)

    def wait_replaced(
        self, slots: list[tuple[int, int]], candidates: set[int], timeout: float = 20
    ) -> int:
        """Until every live node says ``cluster_state:ok`` and agrees that one of
        ``candidates`` owns ``slots`` (``slots_of`` the master replaced); its port."""
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
        with node_client(from_port) as source, node_client(to_port) as target:
            source_id = source.execute_command("CLUSTER", "MYID")
            target_id = target.execute_command("CLUSTER", "MYID")
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while names := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                source.execute_command("MIGRATE", HOST, to_port, "", 0, 5000, "KEYS", *names)
        for port in self.masters():
            with node_client(port) as node:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        eventually(lambda: self.owner(slot) == to_port, timeout=10, what=self.describe)

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


def shared_cluster(name: str, **kwargs: int) -> RedisClusterSet:
    """The ``RedisClusterSet(**kwargs)`` that consecutive tests asking for the fixture
    ``name`` share (``tests.support.shared``), made whole and empty for this one."""
    cluster = SHARED.get(name, lambda: running_cluster(**kwargs))
    cluster.make_whole()
    return cluster


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
