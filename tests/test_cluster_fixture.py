"""The Redis Cluster helper's own promises (``tests.support.cluster``), with real processes
from ``infra/cluster/node.conf``, so that a broker test on a cluster can trust it:

- three masters cover all 16384 slots, run the shipped configuration, and generations
  (one hash tag each) land on all three; ``owner_of`` names the node that holds a key;
- ``failover()`` promotes the master's replica and loses nothing written before;
- ``kill_master()`` gets the replica promoted, no sooner than the node timeout (a crash
  must be noticed) and within a few of them, with an acknowledged write kept;
- ``restart()`` brings the killed master back as the new master's replica, in sync;
- ``make_whole()`` restarts what a test killed and empties the cluster: what the next test
  that shares it (``tests/conftest.py``) starts from, as these do.

The elapsed times are printed (``pytest -s``).
"""

from __future__ import annotations

import shutil
import time

import pytest
import redis.exceptions as redis_errors

from tests.support.cluster import RedisClusterSet
from tests.support.cluster_nodes import HOST, node_client, node_timeout_ms
from tests.support.cluster_views import SLOTS

pytestmark = pytest.mark.redis


def test_three_masters_cover_every_slot_and_share_the_generations(
    redis_cluster: RedisClusterSet,
) -> None:
    cluster = redis_cluster
    masters = cluster.masters()
    assert len(masters) == 3
    assert cluster.seeds == [(HOST, port) for port in masters]
    assert cluster.url == "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in masters)
    assert cluster.topology().covered() == SLOTS
    for port in cluster.nodes:
        with node_client(port) as client:
            info = client.cluster("INFO")
            config = client.config_get("cluster-*")
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_slots_ok"]) == SLOTS
        assert int(info["cluster_known_nodes"]) == 3
        # The shipped file, not Redis's defaults.
        assert int(config["cluster-node-timeout"]) == node_timeout_ms()
        assert config["cluster-require-full-coverage"] == "no"

    keys = [f"sb:{{gen-{n}}}:meta" for n in range(30)]
    owners = {key: cluster.owner_of(key) for key in keys}
    assert set(owners.values()) == set(masters)
    # A generation's keys share its hash tag, so its slot and its node.
    assert cluster.slot_of("sb:{gen-1}:log") == cluster.slot_of("sb:{gen-1}:meta")

    with cluster.client() as client:
        for key in keys:
            client.set(key, key)
    # owner_of names where the key lives: its owner answers, any other master redirects.
    for key, port in owners.items():
        with node_client(port) as owner:
            assert owner.get(key) == key
    first = keys[0]
    other = next(port for port in masters if port != owners[first])
    moved = f"^MOVED {cluster.slot_of(first)} {HOST}:{owners[first]}$"
    with node_client(other) as elsewhere, pytest.raises(redis_errors.ResponseError, match=moved):
        elsewhere.get(first)


# It starts no cluster: here, where the tests go on to another kind of cluster, it keeps no
# two tests that share one apart (``tests.support.shared``).
def test_missing_redis_cli_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like ``start_or_fail``: a cluster test may be skipped locally, never under CI."""
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name: None if name == "redis-cli" else real_which(name)
    )
    monkeypatch.setenv("CI", "true")
    unstarted = RedisClusterSet()
    with pytest.raises(pytest.fail.Exception, match="must not be skipped under CI"):
        unstarted.start()
    assert not unstarted.dir.exists()


def test_failover_promotes_the_replica_and_keeps_what_was_written(
    replicated_cluster: RedisClusterSet,
) -> None:
    cluster = replicated_cluster
    masters = cluster.masters()
    assert len(masters) == 3
    assert all(len(cluster.replicas_of(port)) == 1 for port in masters)
    key = "sb:{failover}:meta"
    old = cluster.owner_of(key)
    (replica,) = cluster.replicas_of(old)

    # One client through the switch: it must follow the slot to its new owner.
    with cluster.client() as client:
        client.set(key, "before")
        started = time.monotonic()
        new = cluster.failover(old)
        print(f"CLUSTER FAILOVER: {replica} promoted in {time.monotonic() - started:.2f} s")
        assert new == replica
        assert cluster.owner_of(key) == new
        assert client.get(key) == "before"
        client.set(key, "after")

    cluster.wait_settled()
    assert cluster.replicas_of(new) == [old]
    with node_client(new) as promoted, node_client(old) as demoted:
        assert promoted.execute_command("ROLE")[0] == "master"
        assert demoted.execute_command("ROLE")[0] == "slave"
        assert promoted.get(key) == "after"


def test_kill_master_promotes_the_replica_within_a_few_node_timeouts(
    replicated_cluster: RedisClusterSet,
) -> None:
    cluster = replicated_cluster
    key = "sb:{crash}:meta"
    old = cluster.owner_of(key)
    (replica,) = cluster.replicas_of(old)
    with node_client(old) as master:
        master.set(key, "acknowledged")
        # WAIT: the replica has it, so a promotion must keep it.
        assert master.execute_command("WAIT", 1, 2000) == 1

    started = time.monotonic()
    new = cluster.kill_master(old)
    took = time.monotonic() - started
    timeout = node_timeout_ms() / 1000
    print(f"kill -9 of a master: {new} promoted in {took:.2f} s (node timeout {timeout} s)")

    assert new == replica
    process = cluster.nodes[old].process
    assert process is not None
    assert process.poll() is not None
    # No sooner than the node timeout: a crash is only noticed after it. Within a few of
    # them: the failure report, the election delay and the vote take about one more.
    assert timeout <= took < 3 * timeout
    assert old not in cluster.masters()
    assert new in cluster.masters()
    with cluster.client() as client:
        assert client.get(key) == "acknowledged"


def test_restart_rejoins_the_killed_master_as_a_replica_in_sync(
    replicated_cluster: RedisClusterSet,
) -> None:
    cluster = replicated_cluster
    key = "sb:{restart}:meta"
    old = cluster.owner_of(key)
    with cluster.client() as client:
        client.set(key, "kept")
    new = cluster.kill_master(old)
    with cluster.client() as client:
        client.set(key, "written while it was down")

    cluster.restart(old)
    took = cluster.wait_settled()
    print(f"restarted master: settled again in {took:.2f} s")

    assert cluster.replicas_of(new) == [old]
    assert old not in cluster.masters()
    assert len(cluster.masters()) == 3
    with node_client(old) as rejoined:
        role = rejoined.execute_command("ROLE")
        assert (role[0], int(role[2])) == ("slave", new)
        assert rejoined.info("replication")["master_link_status"] == "up"
        # It has the new master's data, not only its own AOF's.
        rejoined.execute_command("READONLY")
        assert rejoined.get(key) == "written while it was down"


def test_make_whole_restarts_a_killed_node_and_empties_the_cluster(
    replicated_cluster: RedisClusterSet,
) -> None:
    """What a test that shares the cluster starts from, whatever the one before it did."""
    cluster = replicated_cluster
    with cluster.client() as client:
        client.mset_nonatomic({f"sb:{{left-{n}}}:meta": "over" for n in range(10)})
    replicas = {port: cluster.replicas_of(port) for port in cluster.masters()}
    killed = replicas[min(replicas)][0]
    cluster.nodes[killed].kill()
    cluster.killed.add(killed)

    cluster.make_whole()
    assert cluster.nodes[killed].running
    assert {port: cluster.replicas_of(port) for port in cluster.masters()} == replicas
    with cluster.client() as client:
        assert client.dbsize() == 0  # summed over the masters
