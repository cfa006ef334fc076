"""How readers and creates come through Redis failovers behind Sentinel, over several runs.

Each run starts what ``tests/test_failover.py`` starts: a master, two replicas and three
sentinels from the shipped ``infra/sentinel/`` files (``tests.support.sentinel``, on free
ports of 127.0.0.1), two api processes and two workers with ``REDIS_URL=redis+sentinel://…``.
Then, one phase per fault, in this order on the same set (each changes it for good):

- ``failover``: ``SENTINEL FAILOVER``;
- ``kill``: ``kill -9`` of the master;
- ``restart``: that node started again on its port, from its config and AOF (it comes back
  as the master it was, until Sentinel demotes it). It needs the kill before it, so
  ``--kind restart`` runs ``kill`` then ``restart``.

In each phase ``--generations`` generations of the fake model stream (150 tokens at 60
tokens/s; 900 for ``restart``, to stream through the demotion), each to two readers that
cut their connection every 0.3-1.5 s and resume with ``Last-Event-ID`` on either api
process; the fault comes once every generation has streamed 30 tokens. A reader ends
``completed`` (the exact text and one ``done``), ``explicit`` (an ``error`` event, or 410 on
a resume) or ``silent`` (anything else, a timeout among them: the broker's promise is that
there are none). Times are from the fault: until every sentinel names a new master, until a
create runs to ``done`` (twice in a row) through each api process, until the set is whole
again (every live node a replica in sync).

    .venv/bin/python infra/bench/failover.py                 # 5 runs of all three
    .venv/bin/python -m infra.bench.failover --runs 3 --kind kill --generations 4

Needs redis-server on the PATH. Prints every phase as it ends, then one table per figure.
Exits 1 if a reader diverged silently, a reader repeated an id, or creates took 15 s or
more to work again.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import statistics
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.failover import (  # noqa: E402
    KINDS,
    RECOVERY_SECONDS,
    TITLES,
    PhaseReport,
    broker_processes,
    run_phase,
    summary,
)
from tests.support.sentinel import SentinelSet  # noqa: E402

PHASES = {"failover": ["failover"], "kill": ["kill"], "restart": ["kill", "restart"]}
PHASES["all"] = list(KINDS)


async def one_run(phases: list[str], generations: int, run: int) -> list[PhaseReport]:
    """A fresh set and broker, the phases in order; each phase's report as it ends."""
    reports: list[PhaseReport] = []
    with SentinelSet() as sentinels, broker_processes(sentinels.url) as bases:
        killed: int | None = None
        for number, kind in enumerate(phases):
            seed = 10_000 * run + 1_000 * number
            report = await run_phase(
                kind, sentinels, bases, generations=generations, seed=seed, killed=killed
            )
            print(f"run {run + 1}: {report.describe()}", flush=True)
            reports.append(report)
            if kind == "kill":
                killed = report.port
    return reports


def seconds(values: list[float | None]) -> str:
    """``min / median / max`` in seconds; an unmeasured value is left out, an infinite one
    (never within the limit) shown as such."""
    known = sorted(v for v in values if v is not None)
    if not known:
        return "-"
    shown = [known[0], statistics.median(known), known[-1]]
    return " / ".join("never" if math.isinf(v) else f"{v:.2f}" for v in shown)


def table(reports: list[PhaseReport]) -> list[str]:
    """One row per failover kind, over every run."""
    lines = [
        "| kind | runs | readers: completed / explicit (reasons) / silent "
        "| generations: completed / explicit (reasons) / silent "
        "| completed, stored otherwise | timeouts | repeated ids "
        "| sentinels switched (s) | creates work again (s) | set whole again (s) |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in KINDS:
        of_kind = [r for r in reports if r.kind == kind]
        if not of_kind:
            continue
        readers: Counter[str] = Counter()
        generations: Counter[str] = Counter()
        for report in of_kind:
            readers.update(report.tally())
            generations.update(report.generations())
        lines.append(
            f"| {TITLES[kind]} | {len(of_kind)} | {summary(readers)} | {summary(generations)} "
            f"| {sum(r.completed_but_stored_otherwise for r in of_kind)} "
            f"| {sum(r.timeouts for r in of_kind)} | {sum(r.repeated for r in of_kind)} "
            f"| {seconds([r.switched for r in of_kind])} "
            f"| {seconds([r.recovered for r in of_kind])} "
            f"| {seconds([r.settled for r in of_kind])} |"
        )
    return lines


def broken(reports: list[PhaseReport]) -> list[str]:
    """The promises a phase broke, one line each."""
    found = []
    for number, report in enumerate(reports):
        where = f"phase {number + 1} ({TITLES[report.kind]})"
        if report.tally()["silent"] or report.repeated:
            found.append(f"{where}: {summary(report.tally())}, repeated ids {report.repeated}")
        if report.recovered >= RECOVERY_SECONDS:
            found.append(f"{where}: creates worked again only after {report.recovered:.2f} s")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh sets, each taking the faults")
    parser.add_argument("--generations", type=int, default=6, help="generations per phase")
    parser.add_argument("--kind", choices=sorted(PHASES), default="all", help="which faults")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not on the PATH")
    phases = PHASES[args.kind]
    print(
        f"{args.runs} runs x ({', '.join(phases)}), {args.generations} generations per "
        "phase, 2 readers each, 2 api processes, 2 workers",
        flush=True,
    )
    reports: list[PhaseReport] = []
    for run in range(args.runs):
        reports += asyncio.run(one_run(phases, args.generations, run))
    print("\n" + "\n".join(table(reports)))
    problems = broken(reports)
    for problem in problems:
        print(f"BROKEN: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
