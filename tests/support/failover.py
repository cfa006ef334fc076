"""Failing a Sentinel set over under a running broker, and what its clients saw.

Shared by ``tests/test_sentinel.py``, ``tests/test_failover.py`` and
``infra/bench/failover.py``:

- ``create_and_finish`` / ``seconds_until_creates_work``: whether, and how soon after a
  fault, a create is answered and its generation runs to ``done`` again;
- ``broker_processes``: two api processes and two workers on one ``REDIS_URL`` (what they
  logged of unexpected failures is printed when they stop);
- ``run_phase``: one fault (``KINDS``) applied while generations stream to readers that cut
  and resume across both api processes (``tests.support.failover_readers``), and a
  ``PhaseReport`` of how every reader ended, how the stored generations ended, and how long
  until creates worked again and the set was whole again.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import httpx

from tests.support.failover_readers import FailoverReader, ReaderResult, tally
from tests.support.generations import create_request, expected_text
from tests.support.processes import ApiProcess, BrokerProcess, Launcher
from tests.support.sentinel import SentinelSet
from tests.support.sse import watch
from tests.support.waiting import eventually_async

#: What the issue asks of a failover: creates work again within this, from the fault.
RECOVERY_SECONDS = 15.0

#: The faults, in the order a set can take them: a planned failover, a crash of the master
#: it made, that node coming back (it needs the crash before it).
KINDS = ("failover", "kill", "restart")
TITLES = {
    "failover": "SENTINEL FAILOVER",
    "kill": "kill -9 of the master",
    "restart": "the killed master restarted",
}
#: Pings (and the hub's checks of the logs it reads) every half second.
ENV = {"BROKER_HEARTBEAT_SECONDS": "0.5"}
#: Each generation: 150 tokens at 60 tokens/s, about 2.5 s; the fault comes once every
#: generation has a reader with FAULT_AFTER_TOKENS of them. A restarted master is demoted by
#: Sentinel some 10 s after it is back (it must be seen reporting itself a master for a
#: while first): that phase's generations last 15 s, to stream through the demotion.
MAX_TOKENS = {"failover": 150, "kill": 150, "restart": 900}
RATE = 60
FAULT_AFTER_TOKENS = 30
READERS_PER_GENERATION = 2
#: How long the readers of a phase have to end, from their start.
READ_SECONDS = 40.0

_probe_seeds = itertools.count(1_000_000)


async def create_and_finish(client: httpx.AsyncClient, base: str, seed: int = 0) -> bool:
    """Whether a create is answered 201 and its generation runs to ``done`` within seconds:
    the broker works, all the way through the worker."""
    try:
        with anyio.fail_after(5):
            answer = await client.post(
                f"{base}/v1/streams", json=create_request(max_tokens=8, seed=seed), timeout=2
            )
            if answer.status_code != 201:
                return False
            seen = await watch(client, base, answer.json()["id"])
    except (TimeoutError, httpx.HTTPError):
        return False
    return seen.ended and seen.events[-1].type == "done"


async def seconds_until_creates_work(
    fault: Callable[[], object], sentinel_set: SentinelSet, api: ApiProcess, what: str
) -> float:
    """Cause ``fault``, then create until a generation runs through again; the seconds
    from the fault, printed with when the sentinels had switched. Fails past 15 s."""
    async with httpx.AsyncClient() as client:
        assert await create_and_finish(client, api.url)
        start = time.monotonic()
        old = await anyio.to_thread.run_sync(fault)
        new = await anyio.to_thread.run_sync(sentinel_set.wait_for_new_master, old)
        switched = time.monotonic() - start
        seeds = iter(range(1, 10_000))

        async def works() -> bool:
            return await create_and_finish(client, api.url, next(seeds))

        await eventually_async(works, timeout=RECOVERY_SECONDS, interval=0.1, what=what)
        elapsed = time.monotonic() - start
        print(
            f"\n{what}: master {old} -> {new}; sentinels switched after {switched:.2f} s, "
            f"creates work again after {elapsed:.2f} s"
        )
        # And keep working: not one lucky create.
        for seed in range(3):
            assert await create_and_finish(client, api.url, 10_000 + seed)
    assert elapsed < RECOVERY_SECONDS
    return elapsed


async def until_creates_work(
    client: httpx.AsyncClient, base: str, start: float, limit: float = 2 * RECOVERY_SECONDS
) -> float:
    """Seconds from ``start`` until a create through ``base`` runs to ``done`` and the next
    one does too; ``inf`` when that has not happened ``limit`` seconds after ``start``."""
    while time.monotonic() - start < limit:
        if await create_and_finish(client, base, next(_probe_seeds)):
            elapsed = time.monotonic() - start
            if await create_and_finish(client, base, next(_probe_seeds)):
                return elapsed
        await asyncio.sleep(0.1)
    return math.inf


@contextmanager
def broker_processes(redis_url: str, env: dict[str, str] | None = None) -> Iterator[list[str]]:
    """Two api processes and two workers on ``redis_url``, all with ``env`` (``ENV`` by
    default); the api base URLs. Everything is stopped on exit."""
    env = ENV if env is None else env
    with Launcher(redis_url) as launch:
        processes: list[BrokerProcess] = [launch.api(env) for _ in range(2)]
        urls = [api.url for api in processes if isinstance(api, ApiProcess)]
        processes += [launch.worker(env) for _ in range(2)]
        try:
            yield urls
        finally:
            # Their logs go with them: show what failed unexpectedly (an api's 500) first.
            for process in processes:
                for failure in unexpected_failures(process.output()):
                    print(f"\n{process.name}: {failure}", file=sys.stderr)


def unexpected_failures(output: str) -> list[str]:
    """Each ``unhandled error`` (an api's 500) or traceback a process logged: its first
    line, the broker's own frames (not the libraries') and the exception it ended with."""
    lines, found, i = output.splitlines(), [], 0
    while i < len(lines):
        if "unhandled error" not in lines[i] and "Traceback" not in lines[i]:
            i += 1
            continue
        shown, i = [lines[i]], i + 1
        while i < len(lines) and (not lines[i] or lines[i].startswith(_TRACEBACK_LINES)):
            if _own_frame(lines[i]):
                shown.append(lines[i])
            i += 1
        if i < len(lines):
            shown.append(lines[i])  # the exception and its message
        found.append("\n".join(shown))
    return found


#: How the lines of a traceback start, before the exception's own line.
_TRACEBACK_LINES = (" ", "\t", "Traceback", "During handling", "The above exception")


def _own_frame(line: str) -> bool:
    return 'File "' in line and "site-packages" not in line and "/lib/python" not in line


class FaultTarget(Protocol):
    """What ``run_phase`` breaks: a ``SentinelSet``, or a cluster's
    ``tests.support.cluster.ControlSlotFaults``."""

    def failover(self) -> int: ...
    def kill_master(self) -> int: ...
    def wait_for_new_master(self, old_port: int) -> int: ...
    def restart(self, port: int) -> None: ...
    def wait_settled(self) -> float: ...


@dataclass
class PhaseReport:
    """One fault under streaming generations, as the readers and the store saw it."""

    kind: str
    #: The node the fault hit: the old master, or the node restarted.
    port: int
    readers: list[ReaderResult]
    #: How each generation ended as stored: ``completed``, ``failed:<code>``…
    stored: dict[str, str]
    #: Seconds from the fault until every sentinel named a new master (no switch: None).
    switched: float | None
    #: Seconds from the fault until creates worked again through every api process.
    recovered: float
    #: Seconds from the fault until the set was whole again (``SentinelSet.settled``).
    settled: float
    #: What each fault is called in the report.
    titles: dict[str, str] = field(default_factory=lambda: dict(TITLES))

    def tally(self) -> Counter[str]:
        return tally(self.readers)

    def generations(self) -> Counter[str]:
        """Per generation, its readers' worst end: silent if one was, else explicit if one
        was, else completed; counted as ``tally`` does."""
        by_stream: dict[str, list[ReaderResult]] = {}
        for result in self.readers:
            by_stream.setdefault(result.stream_id, []).append(result)
        worst = []
        for results in by_stream.values():
            silent = [r for r in results if r.outcome == "silent"]
            explicit = [r for r in results if r.outcome == "explicit"]
            worst.append((silent or explicit or results)[0])
        return tally(worst)

    @property
    def completed_but_stored_otherwise(self) -> int:
        """Readers that completed (exact text, ``done``) on a timeline the store then lost:
        after ``SENTINEL FAILOVER`` the old master takes writes for about a second, and a
        generation may finish there. The store later ends it otherwise (a sweeper's
        ``log_lost``); such a reader never resumes, so it is never told."""
        return sum(
            r.outcome == "completed" and self.stored[r.stream_id] != "completed"
            for r in self.readers
        )

    @property
    def timeouts(self) -> int:
        return sum(r.reason == "timeout" for r in self.readers)

    @property
    def repeated(self) -> int:
        return sum(r.repeated for r in self.readers)

    def describe(self) -> str:
        switched = (
            "" if self.switched is None else f"new master named after {self.switched:.2f} s, "
        )
        statuses: Counter[int] = Counter()
        for result in self.readers:
            statuses.update(result.statuses)
        connections = sum(r.connections for r in self.readers)
        return "\n".join(
            [
                f"{self.titles[self.kind]} (node {self.port}): {switched}creates work again after "
                f"{self.recovered:.2f} s, set whole again after {self.settled:.2f} s",
                f"  readers: {summary(self.tally())}; timeouts {self.timeouts}, repeated ids "
                f"{self.repeated}, connections {connections}, retried statuses "
                f"{dict(statuses) or 'none'}",
                f"  generations: {summary(self.generations())}; stored "
                f"{dict(Counter(self.stored.values()))}; readers completed but stored "
                f"otherwise {self.completed_but_stored_otherwise}",
            ]
        )


def summary(counts: Counter[str]) -> str:
    """``completed 6, explicit 2 (error:log_lost 1, http:410 1), silent 0``."""
    parts = []
    for outcome in ("completed", "explicit", "silent"):
        prefix = outcome + ":"
        reasons = sorted(
            f"{k.removeprefix(prefix)} {n}" for k, n in counts.items() if k.startswith(prefix)
        )
        detail = f" ({', '.join(reasons)})" if reasons else ""
        parts.append(f"{outcome} {counts[outcome]}{detail}")
    return ", ".join(parts)


async def run_phase(
    kind: str,
    sentinels: FaultTarget,
    bases: list[str],
    *,
    generations: int,
    seed: int,
    killed: int | None = None,
    tokens: int | None = None,
) -> PhaseReport:
    """Start ``generations`` generations (seeds from ``seed``) with their readers, apply the
    fault ``kind`` once they stream (``restart`` brings back ``killed``), and wait for every
    reader to end, for creates to work again through every api process, and for the set to
    be whole again. ``tokens``: each generation's length, if not the phase's own
    (``MAX_TOKENS``)."""
    async with httpx.AsyncClient(timeout=10) as client:
        tokens = tokens or MAX_TOKENS[kind]
        ids = [
            await _create(client, bases[i % len(bases)], tokens, seed + i)
            for i in range(generations)
        ]
        readers = [
            FailoverReader(client, bases, stream_id, expected_text(tokens, seed + i), seat=s)
            for i, stream_id in enumerate(ids)
            for s in range(READERS_PER_GENERATION)
        ]
        deadline = time.monotonic() + READ_SECONDS
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(reader.run(deadline)) for reader in readers
        ]
        try:
            await eventually_async(
                lambda: _all_streaming(readers), timeout=20, what="every generation streaming"
            )
            start = time.monotonic()
            port, switched = await _cause(kind, sentinels, killed)
            switched_after = time.monotonic() - start if switched else None
            settling = asyncio.create_task(_settled(sentinels, start))
            tasks.append(settling)
            recovered = max(
                await asyncio.gather(*(until_creates_work(client, b, start) for b in bases))
            )
            results: list[ReaderResult] = list(await asyncio.gather(*tasks[: len(readers)]))
            settled: float = await settling
        finally:
            for task in tasks:
                task.cancel()
        stored = {stream_id: await _stored_end(client, bases[0], stream_id) for stream_id in ids}
    titles = getattr(sentinels, "titles", TITLES)
    return PhaseReport(kind, port, results, stored, switched_after, recovered, settled, titles)


async def _settled(sentinels: FaultTarget, start: float) -> float:
    """Seconds from ``start`` until the set is whole again."""
    await anyio.to_thread.run_sync(sentinels.wait_settled)
    return time.monotonic() - start


async def _create(client: httpx.AsyncClient, base: str, tokens: int, seed: int) -> str:
    body = create_request(max_tokens=tokens, rate=RATE, seed=seed)
    answer = await client.post(f"{base}/v1/streams", json=body)
    assert answer.status_code == 201, answer.text
    stream_id: str = answer.json()["id"]
    return stream_id


def _all_streaming(readers: list[FailoverReader]) -> bool:
    streaming = {r.stream_id for r in readers if r.tokens >= FAULT_AFTER_TOKENS}
    return streaming == {r.stream_id for r in readers}


async def _cause(kind: str, sentinels: FaultTarget, killed: int | None) -> tuple[int, bool]:
    """Apply the fault; for a failover or a kill, wait until the sentinels name a new
    master. The node hit, and whether the master changed."""
    if kind == "restart":
        assert killed is not None, "a restart needs a node killed before"
        await anyio.to_thread.run_sync(sentinels.restart, killed)
        return killed, False
    fault = {"failover": sentinels.failover, "kill": sentinels.kill_master}[kind]
    old = await anyio.to_thread.run_sync(fault)
    await anyio.to_thread.run_sync(sentinels.wait_for_new_master, old)
    return old, True


async def _stored_end(client: httpx.AsyncClient, base: str, stream_id: str) -> str:
    """How the store says the generation ended, once it did (retried through 503s)."""

    async def ended() -> str | None:
        try:
            answer = await client.get(f"{base}/v1/streams/{stream_id}")
        except httpx.HTTPError:
            return None
        if answer.status_code != 200:
            return None if answer.status_code == 503 else f"http:{answer.status_code}"
        state: dict[str, Any] = answer.json()
        if state["status"] in ("queued", "running"):
            return None
        error = state.get("error") or {}
        return f"{state['status']}:{error['code']}" if error else str(state["status"])

    return await eventually_async(ended, timeout=30, interval=0.2, what=f"{stream_id} to end")
