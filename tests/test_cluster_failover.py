"""Readers through a shard's failover on a Redis Cluster: exact text or an explicit signal,
never silent divergence (the rule ``tests/test_failover.py`` holds a Sentinel set to).

Three masters with a replica each (``tests.support.cluster``), two api processes and two
workers on ``REDIS_URL=redis+cluster://…``. In each phase generations spread over every
shard stream to readers that cut at random and resume with ``Last-Event-ID`` on either api
process, and mid-stream the shard that serves the control slot (the job queue, the listing
and lease indexes, a third of the generations) takes one fault:

a. ``CLUSTER FAILOVER`` on its replica (planned, nothing lost);
b. ``kill -9`` of the master that made (its replica is elected);
c. that node restarted: it comes back as the master it was, until the cluster makes it a
   replica.

Each reader ends with the exact text and one ``done``, or with an explicit signal; none with
an event id twice; creates work again through both api processes within 15 s of the fault.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from tests.support.cluster import ControlSlotFaults, RedisClusterSet
from tests.support.failover import KINDS, PhaseReport, broker_processes, run_phase
from tests.test_failover import assert_kept_promises

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.e2e]

#: Generations per phase (two readers each): enough that every shard holds some.
GENERATIONS = 9
#: Each about 2.5 s long, in every phase: a restarted node is made a replica within a second
#: or two (no need for the long generations the Sentinel test streams through a demotion).
TOKENS = 150


@pytest.fixture
def bases(replicated_cluster: RedisClusterSet) -> Iterator[list[str]]:
    with broker_processes(replicated_cluster.url) as urls:
        yield urls


async def test_readers_end_exactly_or_explicitly_through_a_shard_failover_kill_and_return(
    replicated_cluster: RedisClusterSet, bases: list[str]
) -> None:
    cluster = replicated_cluster
    faults = ControlSlotFaults(cluster)
    reports: list[PhaseReport] = []
    killed: int | None = None
    for number, kind in enumerate(KINDS):
        report = await run_phase(
            kind,
            faults,
            bases,
            generations=GENERATIONS,
            seed=1000 * number,
            killed=killed,
            tokens=TOKENS,
        )
        print(f"\n{report.describe()}")
        assert_kept_promises(report)
        assert_no_broker_failure(report)
        reports.append(report)
        if kind == "kill":
            killed = report.port
    assert killed is not None
    assert killed not in cluster.masters(), "the restarted master was not made a replica"
    assert sum(r.generations()["completed"] for r in reports) > 0


def assert_no_broker_failure(report: PhaseReport) -> None:
    """Explicit, and also not the broker's own failure: a shard's failover is a blip of the
    store (503, then a resume), never a 500 or a generation ended as ``internal_error``."""
    statuses = Counter[int]()
    for result in report.readers:
        statuses.update(result.statuses)
    assert 500 not in statuses, report.describe()
    assert not any(r.reason == "error:internal_error" for r in report.readers), report.describe()
