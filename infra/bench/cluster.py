"""1 master against 3 masters: what sharding a Redis Cluster buys the broker, on one machine.

Each configuration is a Redis Cluster of real ``redis-server`` processes on free ports of
127.0.0.1, from the shipped ``infra/cluster/node.conf`` (AOF, fsync every second), no
replicas: 3 masters as ``tests.support.cluster`` forms them (``redis-cli --cluster create``),
1 master as a lone cluster node given every slot (``CLUSTER ADDSLOTSRANGE 0 16383``:
redis-cli refuses fewer than 3). On it run ``--apis`` api processes and ``--workers``
workers (``python -m broker api`` / ``worker``, ``REDIS_URL=redis+cluster://…``,
``BROKER_MAX_JOBS=--max-jobs``, ``BROKER_LOG_FORMAT=json``), and after a warm-up two phases:

- ``append``: ``--generations`` generations of the fake model, ``--tokens`` tokens each at
  its fastest (100,000 tokens/s: the workers make tokens as fast as they can), created all
  at once over the api processes. The figure is tokens/s: the completion tokens the broker
  stored (``usage`` of every generation) over the time from the first create to the last
  ``finished_at``. Beside it, events stored (the sum of ``last_event_id``) per second and
  Redis script calls (``EVALSHA`` in ``INFO commandstats``: the appends, plus claims and
  lease renewals) per second, on each master. Every text is then checked against the
  fake model's.
- ``create``: ``--creates`` creates of 1 token each, sent by ``--clients`` concurrent
  requests over the api processes, the workers running them meanwhile. The figure is
  creates/s: the 201 answers over the time from the first request to the last answer.
  Every one must then complete.

Creates go over keep-alive connections with a hand-written HTTP/1.1 client (``RawClient``):
httpx's took more CPU per request than the api process itself, on the same 2 cores.

Completion is watched in Redis (``HGET status`` of the unfinished ones, every 0.2 s), not
through the api, so the api processes do only the measured work. During each phase the CPU
of every process is read from ``/proc/<pid>/stat`` (and the whole machine's from
``/proc/stat``), shown in % of one core: which of Redis, the workers and the api processes
ran out of CPU first. ``other`` is the machine's busy time that none of them (nor this
script) used: what else ran on the machine meanwhile.

Configurations alternate over ``--rounds`` (1, 3, then 3, 1, …), each on a fresh cluster
and fresh processes, so that drift on the machine hits both alike.

    .venv/bin/python infra/bench/cluster.py                       # 2 rounds: ~2-3 min
    .venv/bin/python infra/bench/cluster.py --rounds 3 --workers 4 --generations 400

Needs redis-server and redis-cli on the PATH and the test extras (it imports
``tests.support``). Prints the machine, every phase as it ends, then the tables; exits 1 if
a generation did not complete (or a text differed), a create was not answered 201,
``/readyz`` did not answer 200, or a broker process logged a warning or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from broker import keys  # noqa: E402
from broker.cluster_connections import CONTROL_SLOT  # noqa: E402
from broker.request import MAX_FAKE_TOKENS_PER_SECOND  # noqa: E402
from broker.settings import GenerationSettings  # noqa: E402
from tests.support.cluster import HOST, RedisClusterSet  # noqa: E402
from tests.support.generations import create_request, expected_text  # noqa: E402
from tests.support.processes import BrokerProcess, Launcher  # noqa: E402

CONFIGS = (1, 3)
PHASES = ("append", "create")
UNITS = {"append": "tokens/s", "create": "creates/s"}
TERMINAL = {"completed", "failed", "cancelled"}
TICKS = os.sysconf("SC_CLK_TCK")
POLL_SECONDS = 0.2


class RawClient:
    """One keep-alive HTTP/1.1 connection that POSTs JSON, written by hand: about 0.2 ms of
    this process's CPU per create, where httpx's ``AsyncClient`` took 3 ms alone and 11 ms
    with 64 requests at once (measured here), which made it, not the api, the limit."""

    def __init__(self, base: str) -> None:
        self.host, port = base.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """The status and body of the answer (``ValueError`` for one it cannot read)."""
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        answer = (await self.reader.readuntil(b"\r\n\r\n")).lower()
        status = int(answer[9:12])
        start = answer.find(b"\r\ncontent-length:")
        if start < 0:
            raise ValueError(f"an answer without content-length: {answer[:200]!r}")
        length = int(answer[start + 17 : answer.index(b"\r\n", start + 2)])
        content = await self.reader.readexactly(length)
        if b"\r\nconnection: close" in answer:
            await self.close()
        return status, content

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


# -- CPU -------------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a live process; 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state is fields[0]
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy() -> float:
    """Busy CPU seconds of every core together since boot (all but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / TICKS


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Meter:
    """CPU of the run's processes over one phase: ``{"redis": {label: pid}, ...}``."""

    pids: dict[str, dict[str, int]]
    _start: dict[str, dict[str, float]] = field(default_factory=dict)
    _machine: float = 0.0
    _own: float = 0.0
    _wall: float = 0.0

    def start(self) -> None:
        self._start = self._read()
        self._machine, self._own, self._wall = machine_busy(), own_cpu(), time.monotonic()

    def stop(self) -> Cpu:
        end = self._read()
        wall = time.monotonic() - self._wall
        groups = {
            group: {label: end[group][label] - before for label, before in labels.items()}
            for group, labels in self._start.items()
        }
        bench = own_cpu() - self._own
        busy = machine_busy() - self._machine
        known = bench + sum(v for labels in groups.values() for v in labels.values())
        return Cpu(wall, groups, bench, busy, max(0.0, busy - known))

    def _read(self) -> dict[str, dict[str, float]]:
        return {
            group: {label: process_cpu(pid) for label, pid in labels.items()}
            for group, labels in self.pids.items()
        }


@dataclass
class Cpu:
    """CPU seconds over ``wall`` seconds: per process by group, this script, the machine."""

    wall: float
    groups: dict[str, dict[str, float]]
    bench: float
    machine: float
    other: float

    def percent(self, seconds: float) -> float:
        return 100 * seconds / self.wall if self.wall > 0 else 0.0

    def group(self, name: str) -> str:
        """``sum (each, …)`` in % of one core."""
        values = list(self.groups[name].values())
        each = "/".join(f"{self.percent(v):.0f}" for v in values)
        return f"{self.percent(sum(values)):.0f} ({each})" if len(values) > 1 else each


# -- one configuration -----------------------------------------------------------------------


@dataclass
class Phase:
    masters: int
    round: int
    name: str
    figure: float
    seconds: float
    cpu: Cpu
    load: float
    #: Further figures, already formatted, in the order printed.
    notes: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        notes = "; ".join(f"{k} {v}" for k, v in self.notes.items())
        return (
            f"{self.masters} master{'s' if self.masters > 1 else ''}, round {self.round + 1}, "
            f"{self.name}: {self.figure:,.0f} {UNITS[self.name]} in {self.seconds:.2f} s; "
            f"{notes}"
        )


class Run:
    """One configuration, one round: the cluster, the processes, both phases."""

    def __init__(
        self,
        cluster: RedisClusterSet,
        bases: list[str],
        meter: Meter,
        args: argparse.Namespace,
        processes: list[tuple[str, BrokerProcess]],
    ) -> None:
        self.cluster = cluster
        self.processes = processes
        self.bases = bases
        self.meter = meter
        self.args = args
        self.problems: list[str] = []
        self.masters = cluster.masters()
        self.control = cluster.topology().owner(CONTROL_SLOT)

    async def measure(self, round_number: int) -> list[Phase]:
        seeds = [ClusterNode(HOST, port) for port in self.masters]
        self.store = RedisCluster(startup_nodes=seeds, decode_responses=True)
        # For the state reads after each phase only (creates go through ``RawClient``).
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(timeout=60, limits=limits) as self.http:
            await self.warm_up()
            phases = [await self.append(round_number), await self.create(round_number)]
        await self.store.aclose()
        return phases

    # -- requests ----------------------------------------------------------------------------

    async def create_all(
        self, bodies: list[dict[str, Any]]
    ) -> tuple[dict[str, int], float, Counter[str]]:
        """POST every body over ``--clients`` keep-alive connections (``RawClient``), spread
        evenly over the api processes: the ids answered 201 (each with its body's index),
        the moment of the last answer (``time.time()``), every status."""
        encoded = [json.dumps(body).encode() for body in bodies]
        queue = list(enumerate(encoded))
        queue.reverse()
        ids: dict[str, int] = {}
        statuses: Counter[str] = Counter()
        last = 0.0

        async def client(base: str) -> None:
            nonlocal last
            connection = RawClient(base)
            try:
                while queue:
                    number, body = queue.pop()
                    try:
                        status, answer = await connection.post("/v1/streams", body)
                    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                        statuses[type(exc).__name__] += 1
                        self.problem(f"create: {type(exc).__name__}: {exc}")
                        await connection.close()
                        continue
                    statuses[str(status)] += 1
                    last = time.time()
                    if status == 201:
                        ids[json.loads(answer)["id"]] = number
                    else:
                        self.problem(f"create answered {status}: {answer[:300].decode()}")
            finally:
                await connection.close()

        count = min(self.args.clients, len(bodies))
        await asyncio.gather(*(client(self.bases[n % len(self.bases)]) for n in range(count)))
        return ids, last, statuses

    async def wait_finished(self, ids: Iterable[str], within: float) -> dict[str, str]:
        """Each id's status once all are terminal (or ``within`` seconds), read from Redis."""
        statuses: dict[str, str] = {}
        pending = list(ids)
        deadline = time.monotonic() + within
        while pending and time.monotonic() < deadline:
            pipe = self.store.pipeline()
            for stream_id in pending:
                pipe.hget(keys.meta_key(stream_id), keys.MetaField.STATUS)
            found = await pipe.execute()
            for stream_id, status in zip(pending, found, strict=True):
                statuses[stream_id] = status or "missing"
            pending = [i for i in pending if statuses[i] not in TERMINAL]
            if pending and self.exited():
                break  # a dead worker's generations would only time out
            if pending:
                await asyncio.sleep(POLL_SECONDS)
        return statuses

    def exited(self) -> bool:
        """Whether a broker process has exited (noted as a problem, once each)."""
        dead = False
        for kind, process in self.processes:
            assert process.process is not None
            code = process.process.poll()
            if code is not None:
                dead = True
                note = f"{kind} process {process.process.pid} exited with {code}"
                if note not in self.problems:
                    self.problem(note)
        return dead

    async def state(self, stream_id: str, number: int) -> dict[str, Any]:
        base = self.bases[number % len(self.bases)]
        response = await self.http.get(f"{base}/v1/streams/{stream_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def script_calls(self) -> dict[int, int]:
        """``EVALSHA`` and ``EVAL`` calls so far, per master."""
        calls = {}
        for port in self.masters:
            node = redis.asyncio.Redis(host=HOST, port=port)
            stats = await node.info("commandstats")
            await node.aclose()
            calls[port] = sum(
                stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval")
            )
        return calls

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)

    # -- phases ------------------------------------------------------------------------------

    async def warm_up(self) -> None:
        """A few generations through every api process and worker: connections, scripts."""
        bodies = [
            create_request(max_tokens=50, rate=MAX_FAKE_TOKENS_PER_SECOND, seed=n)
            for n in range(4 * len(self.bases) * self.args.workers)
        ]
        ids, _, _ = await self.create_all(bodies)
        await self.wait_finished(ids, within=30)

    async def append(self, round_number: int) -> Phase:
        args = self.args
        seed0 = 1_000_000 * (round_number + 1)
        bodies = [
            create_request(max_tokens=args.tokens, rate=MAX_FAKE_TOKENS_PER_SECOND, seed=seed0 + n)
            for n in range(args.generations)
        ]
        load = os.getloadavg()[0]
        calls_before = await self.script_calls()
        self.meter.start()
        start = time.time()
        ids, _, _ = await self.create_all(bodies)
        statuses = await self.wait_finished(ids, within=args.timeout)
        cpu = self.meter.stop()
        calls_after = await self.script_calls()
        # Outside the measured window: every generation's state through the api.
        states = await asyncio.gather(*(self.state(i, n) for i, n in ids.items()))
        tokens = events = wrong = 0
        finished = start
        for state in states:
            seed = bodies[ids[state["id"]]]["fake"]["seed"]
            if state["status"] != "completed":
                self.problem(f"append: {state['id']} is {state['status']}: {state['error']}")
                continue
            tokens += (state["usage"] or {}).get("completion_tokens", 0)
            events += state["last_event_id"]
            finished = max(finished, iso_seconds(state["finished_at"]))
            if state["text"] != expected_text(args.tokens, seed):
                wrong += 1
                self.problem(f"append: {state['id']} has another text than the fake model's")
        seconds = max(finished - start, 1e-9)  # none completed: every figure 0
        calls = {port: calls_after[port] - calls_before[port] for port in self.masters}
        ended = Counter(statuses.values())
        worker_cpu = sum(cpu.groups["workers"].values())
        notes = {
            "tokens per event": f"{tokens / events:.1f}" if events else "-",
            "worker CPU per token": f"{1e6 * worker_cpu / tokens:.0f} µs" if tokens else "-",
            "events/s": f"{events / seconds:,.0f}",
            "script calls/s": f"{sum(calls.values()) / seconds:,.0f}"
            + f" ({self.per_master(calls, seconds)})",
            "generations": status_summary(ended, len(bodies)),
            "wrong texts": str(wrong),
        }
        return Phase(self.cluster.master_count, round_number, "append", tokens / seconds,
                     seconds, cpu, load, notes)  # fmt: skip

    async def create(self, round_number: int) -> Phase:
        args = self.args
        seed0 = 1_000_000 * (round_number + 1) + 500_000
        bodies = [
            create_request(max_tokens=1, rate=MAX_FAKE_TOKENS_PER_SECOND, seed=seed0 + n)
            for n in range(args.creates)
        ]
        load = os.getloadavg()[0]
        calls_before = await self.script_calls()
        self.meter.start()
        start = time.time()
        ids, last, answers = await self.create_all(bodies)
        cpu = self.meter.stop()
        calls_after = await self.script_calls()
        statuses = await self.wait_finished(ids, within=args.timeout)
        ended = Counter(statuses.values())
        unfinished = Counter(v for v in statuses.values() if v != "completed")
        if unfinished:
            self.problem(
                f"create: {sum(unfinished.values())} of {len(ids)} generations not completed "
                f"by the end of the wait ({status_summary(unfinished, 0)}), e.g. "
                + ", ".join(i for i, v in statuses.items() if v != "completed")[:90]
            )
        seconds = max(last - start, 1e-9)
        calls = {port: calls_after[port] - calls_before[port] for port in self.masters}
        api_cpu = sum(cpu.groups["apis"].values())
        notes = {
            "api CPU per create": f"{1e3 * api_cpu / len(ids):.2f} ms" if ids else "-",
            "answers": ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())),
            "script calls/s": f"{sum(calls.values()) / seconds:,.0f}"
            + f" ({self.per_master(calls, seconds)})",
            "generations": status_summary(ended, len(ids)),
        }
        return Phase(self.cluster.master_count, round_number, "create", len(ids) / seconds,
                     seconds, cpu, load, notes)  # fmt: skip

    def per_master(self, counts: dict[int, int], seconds: float) -> str:
        """Per master, the control slot's marked ``c``."""
        return "/".join(
            f"{counts[p] / seconds:,.0f}{'c' if p == self.control else ''}" for p in self.masters
        )


def iso_seconds(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def status_summary(ended: Counter[str], expected: int) -> str:
    parts = [f"{status} {count}" for status, count in sorted(ended.items())]
    missing = expected - sum(ended.values())
    if missing:
        parts.append(f"never created {missing}")
    return ", ".join(parts)


# -- logs ------------------------------------------------------------------------------------


def log_findings(processes: Iterable[tuple[str, BrokerProcess]]) -> Counter[str]:
    """Lines at warning or above (and any line that is not JSON: a traceback, a crash) in the
    broker processes' logs, counted by process kind and text."""
    found: Counter[str] = Counter()
    for kind, process in processes:
        for line in process.output().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                found[f"{kind}: {line.strip()[:300]}"] += 1
                continue
            if not isinstance(record, dict) or record.get("level") in ("warning", "error"):
                what = {
                    k: v for k, v in record.items() if k not in ("ts", "stream_id", "exc", "job_id")
                }
                found[f"{kind}: {json.dumps(what)[:400]}"] += 1
                if record.get("exc"):
                    found[f"{kind}:   exc {str(record['exc']).splitlines()[-1][:300]}"] += 1
    return found


#: Lines Redis 7 logs at warning level (``#``) on every start and cluster creation.
REDIS_ROUTINE = (
    "oO0OoO0OoO0Oo",
    "Redis version=",
    "Configuration loaded",
    "Server initialized",
    "configEpoch set to",
    "IP address for this node updated",
    "Cluster state changed: ok",
    "WARNING",  # the host's own advice (overcommit, THP): not the broker's doing
)


def redis_warnings(cluster: RedisClusterSet) -> Counter[str]:
    """Warning lines (``#``) of every node's log, less the routine ones."""
    found: Counter[str] = Counter()
    for port, node in cluster.nodes.items():
        path = node.dir / "redis.log"
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if " # " in line and not any(text in line for text in REDIS_ROUTINE):
                found[f"redis {port}: {line.split(' # ', 1)[1][:200]}"] += 1
    return found


def one_run(
    masters: int, round_number: int, args: argparse.Namespace
) -> tuple[list[Phase], list[str], Counter[str]]:
    """A fresh cluster and broker of ``masters`` masters, both phases: their figures, the
    problems seen (a generation not completed, a create refused), and the log findings."""
    env = {"BROKER_LOG_FORMAT": "json", "BROKER_MAX_JOBS": str(args.max_jobs)}
    if args.batch_tokens:
        env["BROKER_BATCH_MAX_TOKENS"] = str(args.batch_tokens)
    with RedisClusterSet(masters=masters) as cluster, Launcher(cluster.url) as launch:
        apis = [launch.api(env) for _ in range(args.apis)]  # each ready: /readyz 200
        workers = [launch.worker(env) for _ in range(args.workers)]
        pids = {
            "redis": {str(port): node.process.pid for port, node in cluster.nodes.items()},  # type: ignore[union-attr]
            "workers": {str(n): w.process.pid for n, w in enumerate(workers)},  # type: ignore[union-attr]
            "apis": {str(n): a.process.pid for n, a in enumerate(apis)},  # type: ignore[union-attr]
        }
        named = [("api", a) for a in apis] + [("worker", w) for w in workers]
        run = Run(cluster, [a.url for a in apis], Meter(pids), args, named)
        phases = asyncio.run(run.measure(round_number))
        for phase in phases:
            print(f"  {phase.line()}", flush=True)
        findings = log_findings(named) + redis_warnings(cluster)
        if args.keep_logs:
            directory = Path(args.keep_logs) / f"{masters}-masters-round-{round_number + 1}"
            directory.mkdir(parents=True, exist_ok=True)
            for kind, process in named:
                shutil.copy(process.log_path, directory / f"{kind}-{process.process.pid}.log")  # type: ignore[union-attr]
            for port, node in cluster.nodes.items():
                shutil.copy(node.dir / "redis.log", directory / f"redis-{port}.log")
        return phases, run.problems, findings


# -- report ----------------------------------------------------------------------------------


def machine() -> list[str]:
    def run(*command: str) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError:
            return "?"
        return done.stdout.strip()

    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.startswith("model name")), "?")  # fmt: skip
    mem = next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
               if ln.startswith("MemTotal"))  # fmt: skip
    speedups = [m for m in ("uvloop", "httptools") if _importable(m)]
    commit = run("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    if run("git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"):
        commit += " + uncommitted changes"
    return [
        f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit}",
        f"machine: {os.cpu_count()} cores ({model}), {int(mem) / 1024 / 1024:.1f} GiB, "
        f"Python {platform.python_version()}, {run('redis-server', '--version')}, "
        f"{' and '.join(speedups) or 'neither uvloop nor httptools'} installed",
        f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
    ]


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def figures_table(phases: list[Phase], name: str, rounds: int) -> list[str]:
    head = " | ".join(f"round {r + 1}" for r in range(rounds))
    lines = [
        f"| {UNITS[name]} | {head} | median |",
        "| --- |" + " ---: |" * (rounds + 1),
    ]
    medians = {}
    for masters in CONFIGS:
        values = [p.figure for p in of(phases, name, masters)]
        medians[masters] = statistics.median(values) or float("nan")
        cells = " | ".join(f"{v:,.0f}" for v in values)
        lines.append(f"| {masters} master{'s' if masters > 1 else ''} | {cells} "
                     f"| {medians[masters]:,.0f} |")  # fmt: skip
    ratios = " | ".join(
        f"{a.figure / b.figure:.2f}" if b.figure else "-"
        for a, b in zip(of(phases, name, 3), of(phases, name, 1), strict=True)
    )
    lines.append(f"| 3 masters / 1 master | {ratios} | {medians[3] / medians[1]:.2f} |")
    return lines


def of(phases: list[Phase], name: str, masters: int) -> list[Phase]:
    """The ``name`` phases of ``masters``, by round."""
    mine = [p for p in phases if p.name == name and p.masters == masters]
    return sorted(mine, key=lambda p: p.round)


def cpu_table(phases: list[Phase], cores: int) -> list[str]:
    lines = [
        "| phase | masters | round | load avg | figure | redis-server (each) | workers (each) "
        "| apis (each) | this script | other | machine busy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in sorted(phases, key=lambda p: (PHASES.index(p.name), p.masters, p.round)):
        c = p.cpu
        lines.append(
            f"| {p.name} | {p.masters} | {p.round + 1} | {p.load:.2f} | {p.figure:,.0f} "
            f"| {c.group('redis')} | {c.group('workers')} | {c.group('apis')} "
            f"| {c.percent(c.bench):.0f} | {c.percent(c.other):.0f} "
            f"| {c.percent(c.machine):.0f} of {100 * cores} |"
        )
    return lines


def notes_table(phases: list[Phase]) -> list[str]:
    lines = []
    for p in sorted(phases, key=lambda p: (PHASES.index(p.name), p.masters, p.round)):
        lines.append(f"- {p.line()}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each configuration")
    parser.add_argument("--generations", type=int, default=200, help="append phase: generations")
    parser.add_argument("--tokens", type=int, default=500, help="append phase: tokens each")
    parser.add_argument("--creates", type=int, default=2000, help="create phase: creates")
    parser.add_argument("--clients", type=int, default=64, help="concurrent requests")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--apis", type=int, default=2, help="api processes")
    parser.add_argument("--max-jobs", type=int, default=200, help="BROKER_MAX_JOBS per worker")
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=0,
        help=f"BROKER_BATCH_MAX_TOKENS (0: the default, {GenerationSettings.batch_max_tokens})",
    )
    parser.add_argument("--timeout", type=float, default=120, help="seconds for a phase to end")
    parser.add_argument("--keep-logs", default="", help="copy every process's log here")
    args = parser.parse_args()
    for binary in ("redis-server", "redis-cli"):
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} is not on the PATH")
    cores = os.cpu_count() or 1
    for line in machine():
        print(line)
    batch = args.batch_tokens or GenerationSettings.batch_max_tokens
    print(
        f"{args.apis} api processes, {args.workers} workers (BROKER_MAX_JOBS={args.max_jobs}, "
        f"batches of at most {batch} tokens or {GenerationSettings.batch_max_age_ms:g} ms); "
        f"append: {args.generations} generations x {args.tokens} tokens at "
        f"{MAX_FAKE_TOKENS_PER_SECOND:g} tokens/s; create: {args.creates} creates of 1 token, "
        f"{args.clients} at once; {args.rounds} rounds, order 1,3 / 3,1 / …",
        flush=True,
    )
    print(
        f"NOTE: {cores} cores for everything (Redis, api processes, workers, this script): "
        "every figure below is a share of those, not what each part would do alone.",
        flush=True,
    )
    phases: list[Phase] = []
    problems: list[str] = []
    findings: Counter[str] = Counter()
    for round_number in range(args.rounds):
        order = CONFIGS if round_number % 2 == 0 else tuple(reversed(CONFIGS))
        for masters in order:
            print(f"round {round_number + 1}, {masters} master(s): load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
            got, found_problems, found_logs = one_run(masters, round_number, args)
            phases += got
            problems += [
                f"{masters} masters, round {round_number + 1}: {p}" for p in found_problems
            ]
            findings.update({f"{masters} masters: {k}": v for k, v in found_logs.items()})
    for name in PHASES:
        print(f"\n{name} ({UNITS[name]})")
        print("\n".join(figures_table(phases, name, args.rounds)))
    print(f"\nCPU during each phase, % of one core ({cores} cores: {100 * cores} % at most)")
    print("\n".join(cpu_table(phases, cores)))
    print("\n" + "\n".join(notes_table(phases)))
    if findings:
        print("\nbroker and Redis log lines at warning or above (count: line):")
        for line, count in findings.most_common(40):
            print(f"  {count}: {line}")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    broker_lines = [k for k in findings if not k.split(": ", 1)[1].startswith("redis ")]
    return 1 if problems or broker_lines else 0


if __name__ == "__main__":
    sys.exit(main())
