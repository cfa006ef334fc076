"""Readers through failovers: exact text or an explicit signal, never silent divergence.

A master, two replicas and three sentinels from the shipped ``infra/sentinel/`` files
(``tests.support.sentinel``), two api processes and two workers with
``REDIS_URL=redis+sentinel://…``. In each phase generations of the fake model stream to
readers that cut their connection at random and resume with ``Last-Event-ID`` on either
api process (``tests.support.failover_readers``), and mid-stream the set takes one fault:

a. ``SENTINEL FAILOVER``;
b. ``kill -9`` of the master that failover made;
c. that node restarted: it comes back as the master it was, with its AOF, until Sentinel
   demotes it.

Each reader ends with the exact text and one ``done``, or with an explicit signal (an
``error`` event, or 410 on a resume); none silently (another text, a 204 without the end, no
end by the deadline), none with an event id twice; creates work again through both api
processes within 15 s of the fault. The counts are printed (``pytest -s``); over several
runs, ``infra/bench/failover.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.failover import (
    KINDS,
    RECOVERY_SECONDS,
    PhaseReport,
    broker_processes,
    run_phase,
)
from tests.support.sentinel import SentinelSet

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.e2e]

#: Generations per phase, each with two readers.
GENERATIONS = 4


@pytest.fixture
def sentinel_set() -> Iterator[SentinelSet]:
    with SentinelSet() as sentinels:
        yield sentinels


@pytest.fixture
def bases(sentinel_set: SentinelSet) -> Iterator[list[str]]:
    """The base URLs of two api processes; two workers run beside them."""
    with broker_processes(sentinel_set.url) as urls:
        yield urls


async def test_readers_end_exactly_or_explicitly_through_failover_kill_and_return(
    sentinel_set: SentinelSet, bases: list[str]
) -> None:
    """The phases in order, on one set: each changes it for good."""
    reports: list[PhaseReport] = []
    killed: int | None = None
    for number, kind in enumerate(KINDS):
        report = await run_phase(
            kind, sentinel_set, bases, generations=GENERATIONS, seed=1000 * number, killed=killed
        )
        print(f"\n{report.describe()}")
        assert_kept_promises(report)
        reports.append(report)
        if kind == "kill":
            killed = report.port
    assert killed is not None
    assert sentinel_set.role(killed) == "slave", "the restarted master was not demoted"
    # A broker that ended every generation explicitly would pass each phase: some complete.
    assert sum(r.generations()["completed"] for r in reports) > 0


def assert_kept_promises(report: PhaseReport) -> None:
    counts = report.tally()
    assert counts["silent"] == 0, report.describe()
    assert report.timeouts == 0, report.describe()
    assert report.repeated == 0, report.describe()
    assert counts["completed"] + counts["explicit"] == len(report.readers)
    assert report.recovered < RECOVERY_SECONDS, report.describe()
