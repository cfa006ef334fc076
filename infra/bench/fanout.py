"""Fan-out benchmark: many SSE clients on one api process, beside a hand-written baseline.

    python infra/bench/fanout.py              # scenarios of 100, 1,000 and 5,000 clients
    python infra/bench/fanout.py --quick      # a tiny scenario, to see that it works

It starts everything itself on free ports of 127.0.0.1 and stops it at the end (also on
Ctrl-C or an error): a private ``redis-server`` (temp dir, no persistence), the broker's
workers (``python -m broker worker``), and per scenario a fresh ``python -m broker api
--workers 1`` and a fresh baseline (``baseline_relay.py``: sse-starlette and one
``XREAD BLOCK`` per client, what people write by hand today). Each scenario runs twice over
freshly created generations of the ``fake`` model, once with every client on the broker's
api and once with every client on the baseline, so both see the same load:

1. the workers are paused (SIGSTOP) and the generations are created: ``--streams`` that the
   clients spread over evenly, and ``--cancel-streams`` that will be cancelled half-way;
2. light clients (``loadgen.py``, up to ``--clients-per-proc`` per process) connect to the
   measured server, each watching one generation from its start, and wait; once the server
   has settled (idle, its Redis connections steady), its RSS and connections are read;
3. the workers resume (SIGCONT): every event reaches every client live. CPU (server, Redis,
   workers, load generators, the machine) is measured from here until the last client has
   its terminal event; half-way the extra generations are cancelled, and ``--probes`` short
   generations are created along the way to measure job pickup under the load.

It prints a table per scenario (broker | baseline | baseline ÷ broker) and the benchmark's
targets with PASS/FAIL, and writes it all as JSON (``--out``). infra/README.md says what each
figure means and how it is measured. Needs ``pip install -e '.[bench]'`` (httpx, psutil,
sse-starlette) and redis-server on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import redis
import redis.asyncio as aioredis
from fanout_procs import (
    BenchError,
    Child,
    Infra,
    Processes,
    raise_fd_limit,
    start_api,
    start_baseline,
    start_redis,
    tail,
)
from fanout_report import (
    BUCKETS_PER_MS,
    check_targets,
    git_commit,
    header,
    machine_info,
    percentile,
    percentile_hist,
    scenario_table,
    targets_table,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LOADGEN = HERE / "loadgen.py"
TARGETS = ("broker", "baseline")

DEFAULTS: dict[str, Any] = {
    "clients": "100,1000,5000",
    "streams": 20,
    "tokens": 200,
    "rate": 50.0,
    "cancel_streams": 4,
    "cancel_watchers": 10,
    "probes": 20,
}
QUICK: dict[str, Any] = {
    "clients": "20",
    "streams": 2,
    "tokens": 40,
    "rate": 50.0,
    "cancel_streams": 1,
    "cancel_watchers": 2,
    "probes": 4,
}
TERMINAL_STATUSES = ("completed", "failed", "cancelled")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Config:
    scenarios: list[int]
    streams: int
    tokens: int
    rate: float
    rate_spread: float
    cancel_streams: int
    cancel_watchers: int
    probes: int
    targets: tuple[str, ...]
    worker_procs: int
    clients_per_proc: int
    connect_concurrency: int
    heartbeat: float
    run_timeout: float | None
    broker_dir: Path
    out: Path
    keep_logs: bool
    check: bool
    pin: bool
    loadgen_nice: int
    label: str | None
    command: str

    @property
    def generation_seconds(self) -> float:
        """How long a generation at the nominal ``--rate`` takes."""
        return self.tokens / self.rate

    def rate_of(self, index: int, count: int) -> float:
        """Rates spread evenly over ``rate ± spread``, mean ``rate``: generations that all
        start together (the workers resume at once) drift out of lockstep within a few
        tokens instead of appending in the same millisecond for the whole run."""
        if count < 2:
            return self.rate
        return self.rate * (1 + self.rate_spread * (2 * index / (count - 1) - 1))

    def connect_seconds(self, clients: int) -> float:
        """Longest the clients of one run may take to connect."""
        return 30 + clients / 50

    def live_seconds(self, clients: int) -> float:
        """Longest the live part of one run may take: generous, since a server that falls
        behind but completes is a result, not a failure."""
        if self.run_timeout is not None:
            return self.run_timeout
        return 60 + 6 * self.generation_seconds + clients / 100

    def as_json(self) -> dict[str, Any]:
        return {
            "scenarios": self.scenarios,
            "streams": self.streams,
            "tokens": self.tokens,
            "rate": self.rate,
            "rate_spread": self.rate_spread,
            "cancel_streams": self.cancel_streams,
            "cancel_watchers": self.cancel_watchers,
            "probes": self.probes,
            "targets": list(self.targets),
            "worker_procs": self.worker_procs,
            "clients_per_proc": self.clients_per_proc,
            "connect_concurrency": self.connect_concurrency,
            "heartbeat": self.heartbeat,
            "pin": self.pin,
            "loadgen_nice": self.loadgen_nice,
            "broker_env": {k: v for k, v in os.environ.items() if k.startswith("BROKER_")},
        }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--clients", help=f"scenarios, comma-separated client counts ({DEFAULTS['clients']})")
    add("--streams", type=int, help=f"generations the clients spread over ({DEFAULTS['streams']})")
    add("--tokens", type=int, help=f"tokens per generation ({DEFAULTS['tokens']})")
    add("--rate", type=float, help=f"tokens per second per generation ({DEFAULTS['rate']:g})")
    add(
        "--rate-spread",
        type=float,
        default=0.1,
        help="rates spread evenly over rate x (1 ± this), mean --rate (0.1)",
    )
    add(
        "--cancel-streams",
        type=int,
        help=f"extra generations cancelled half-way ({DEFAULTS['cancel_streams']})",
    )
    add(
        "--cancel-watchers",
        type=int,
        help=f"clients on each, besides --clients ({DEFAULTS['cancel_watchers']})",
    )
    add(
        "--probes",
        type=int,
        help=f"short generations created under load to time job pickup ({DEFAULTS['probes']})",
    )
    add(
        "--quick",
        action="store_true",
        help="a tiny scenario: "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    add("--only", choices=TARGETS, help="measure one side only")
    add("--worker-procs", type=int, default=1, help="broker worker processes (1)")
    add("--clients-per-proc", type=int, default=500, help="clients per load generator (500)")
    add(
        "--connect-concurrency",
        type=int,
        default=64,
        help="connections a load generator opens at once (64)",
    )
    add(
        "--heartbeat",
        type=float,
        default=os.environ.get("BROKER_HEARTBEAT_SECONDS", "15"),  # argparse applies type
        help="BROKER_HEARTBEAT_SECONDS, and the baseline's XREAD block and ping (15)",
    )
    add(
        "--run-timeout",
        type=float,
        help="longest the live part of a run may take "
        "(60 s + 6 x the generation time + clients/100 s)",
    )
    add(
        "--broker-dir",
        type=Path,
        default=REPO,
        help="source tree the api and workers run from (this checkout)",
    )
    add("--out", type=Path, help="JSON file (infra/bench/results/fanout-<UTC time>.json)")
    add("--keep-logs", action="store_true", help="copy every process's log beside the JSON")
    add("--check", action="store_true", help="exit 2 when a judged target fails")
    add(
        "--pin",
        action="store_true",
        help="give the measured server a core of its own (the last one) and every other "
        "process of the run the rest",
    )
    add(
        "--loadgen-nice",
        type=int,
        default=0,
        help="run the load generators this much nicer, so that on a small machine the "
        "servers, Redis and the workers get the CPU first (0)",
    )
    add("--label", help="free text kept with the results, e.g. the commit of a --broker-dir copy")
    return parser


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = _parser()
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    v = {k: base[k] if getattr(args, k) is None else getattr(args, k) for k in DEFAULTS}
    try:
        scenarios = [int(x.replace("_", "")) for x in str(v["clients"]).split(",")]
    except ValueError:
        parser.error(f"--clients takes comma-separated integers, not {v['clients']!r}")
    if min(scenarios) < 1 or v["streams"] < 1 or v["rate"] <= 0 or v["tokens"] < 2:
        parser.error("--clients, --streams and --rate must be positive, --tokens at least 2")
    if not 0 <= args.rate_spread < 1:
        parser.error("--rate-spread must be at least 0 and below 1")
    if v["cancel_streams"] < 0 or v["cancel_watchers"] < 1 or v["probes"] < 0:
        parser.error("--cancel-streams and --probes must be ≥ 0, --cancel-watchers ≥ 1")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Config(
        scenarios=scenarios,
        streams=v["streams"],
        tokens=v["tokens"],
        rate=v["rate"],
        rate_spread=args.rate_spread,
        cancel_streams=v["cancel_streams"],
        cancel_watchers=v["cancel_watchers"],
        probes=v["probes"],
        targets=(args.only,) if args.only else TARGETS,
        worker_procs=args.worker_procs,
        clients_per_proc=args.clients_per_proc,
        connect_concurrency=args.connect_concurrency,
        heartbeat=args.heartbeat,
        run_timeout=args.run_timeout,
        broker_dir=args.broker_dir.resolve(),
        out=args.out or HERE / "results" / f"fanout-{stamp}.json",
        keep_logs=args.keep_logs,
        check=args.check,
        pin=args.pin,
        loadgen_nice=args.loadgen_nice,
        label=args.label,
        command=shlex.join(["python", *sys.argv]),
    )


# --------------------------------------------------------------------------------------------
# Generations


@dataclass
class Generation:
    id: str
    #: The text every watcher must receive; None for one that is cancelled mid-way.
    expected: str | None

    @property
    def to_cancel(self) -> bool:
        return self.expected is None


def generation_body(seed: int, tokens: int, rate: float) -> dict[str, Any]:
    return {
        "model": "fake",
        "messages": [{"role": "user", "content": f"fan-out benchmark, generation {seed}"}],
        "max_tokens": tokens,
        "fake": {"tokens_per_second": rate, "seed": seed},
        "metadata": {"bench": "fanout"},
    }


def probe_body() -> dict[str, Any]:
    return generation_body(-1, 4, 1000.0)


async def create(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await http.post("/v1/streams", json=body)
    if response.status_code != 201:
        raise BenchError(f"POST /v1/streams answered {response.status_code}: {response.text}")
    stream_id: str = response.json()["id"]
    return stream_id


async def create_generations(http: httpx.AsyncClient, cfg: Config) -> list[Generation]:
    """The watched generations, then those to be cancelled. Seeds are their index, so the
    broker's run and the baseline's stream the same texts."""
    # The fake of the tree being measured (--broker-dir is first on sys.path).
    from workers.providers.fake import fake_tokens

    made = []
    count = cfg.streams + cfg.cancel_streams
    for seed in range(count):
        body = generation_body(seed, cfg.tokens, cfg.rate_of(seed, count))
        stream_id = await create(http, body)
        if seed < cfg.streams:
            text = "".join(fake_tokens(body["messages"], cfg.tokens, seed))
            made.append(Generation(stream_id, text))
        else:
            made.append(Generation(stream_id, None))
    return made


async def read_events(http: httpx.AsyncClient, base: str, stream_id: str) -> list[dict[str, Any]]:
    """Every event of a generation, through one plain GET that returns when it has ended."""
    response = await http.get(f"{base}/v1/streams/{stream_id}/events")
    events, kind = [], ""
    for line in response.text.replace("\r\n", "\n").split("\n"):
        if line.startswith("event:"):
            kind = line.partition(":")[2].strip()
        elif line.startswith("data:"):
            events.append({"event": kind, **json.loads(line.partition(":")[2])})
    return events


async def warm_up(http: httpx.AsyncClient, server_url: str) -> None:
    """One short generation read through the measured server: imports, pools and the
    worker's first job happen before anything is measured."""
    stream_id = await create(http, probe_body())
    async with asyncio.timeout(30):
        events = await read_events(http, server_url, stream_id)
    if not events or events[-1]["event"] != "done":
        raise BenchError(f"warm-up generation {stream_id} did not end with done: {events[-1:]}")


async def final_states(http: httpx.AsyncClient, gens: list[Generation]) -> list[dict[str, Any]]:
    """The broker's own view of each generation once it has ended. One still running (its
    clients gave up at the deadline) is cancelled first, so it neither loads the next run
    nor keeps this one waiting."""

    async def state(gen: Generation) -> dict[str, Any]:
        answer: dict[str, Any] = (await http.get(f"/v1/streams/{gen.id}")).json()
        return answer

    states = [await state(g) for g in gens]
    for gen, st in zip(gens, states, strict=True):
        if st["status"] not in TERMINAL_STATUSES:
            await http.post(f"/v1/streams/{gen.id}/cancel")
    async with asyncio.timeout(30):
        for i, gen in enumerate(gens):
            while states[i]["status"] not in TERMINAL_STATUSES:
                await asyncio.sleep(0.1)
                states[i] = await state(gen)
    return states


# --------------------------------------------------------------------------------------------
# Load generators


def assign_clients(cfg: Config, clients: int) -> list[int]:
    """The generation each client watches: ``clients`` spread evenly over ``--streams``,
    then ``--cancel-watchers`` on each generation that will be cancelled."""
    watched = [i % cfg.streams for i in range(clients)]
    cancelled = [
        cfg.streams + k for k in range(cfg.cancel_streams) for _ in range(cfg.cancel_watchers)
    ]
    return watched + cancelled


@dataclass
class LoadGen:
    process: asyncio.subprocess.Process
    log: Path
    connected: dict[str, Any] = field(default_factory=dict)
    done: dict[str, Any] = field(default_factory=dict)

    async def read_line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            raise BenchError(f"a load generator exited early; its log:\n{tail(self.log)}")
        result: dict[str, Any] = json.loads(line)
        return result

    async def stop(self) -> None:
        """Closing stdin ends it (it exits on EOF); killed if it does not."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            async with asyncio.timeout(5):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def start_loadgens(
    cfg: Config, run: Run, gens: list[Generation], assignment: list[int], deadline: float
) -> list[LoadGen]:
    host, port = run.server_url.removeprefix("http://").rsplit(":", 1)
    count = math.ceil(len(assignment) / cfg.clients_per_proc)
    streams = [
        {"id": g.id, "expected": g.expected, "finish_reason": None if g.to_cancel else "stop"}
        for g in gens
    ]
    loadgens = []
    for i in range(count):
        job = {
            "host": host,
            "port": int(port),
            "streams": streams,
            "clients": assignment[i::count],  # every process gets clients of every stream
            "connect_concurrency": cfg.connect_concurrency,
            "connect_timeout": cfg.connect_seconds(len(assignment)),
            "deadline": deadline,
            "nice": cfg.loadgen_nice,
        }
        log = run.logdir / f"loadgen-{run.target}-{run.clients}-{i}.log"
        with log.open("ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(LOADGEN),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                limit=256 * 2**20,  # the summary is one long JSON line
                start_new_session=True,
            )
        assert process.stdin is not None
        process.stdin.write(json.dumps(job).encode() + b"\n")
        await process.stdin.drain()
        loadgens.append(LoadGen(process, log))
    return loadgens


# --------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Run:
    """One scenario on one side."""

    cfg: Config
    infra: Infra
    api_url: str  # generations are always created and cancelled through the broker
    target: str
    server_url: str  # where the clients connect
    server: psutil.Process
    clients: int
    logdir: Path


def redis_connections(process: psutil.Process, redis_port: int) -> int:
    """Established TCP connections from the process to Redis, as the kernel lists them."""
    return sum(
        1
        for c in process.net_connections(kind="tcp")
        if c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED
    )


def process_cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores, all processes)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


@dataclass(frozen=True)
class Counters:
    """Cumulative counters read at the phase boundaries of a run."""

    at: float
    server_cpu: float
    server_rss: int
    workers_cpu: float
    redis_cpu: float
    machine_busy: float
    bench_cpu: float
    #: Calls Redis served: every command, and XREAD alone (the readers' share).
    redis_calls: int
    redis_xreads: int
    #: Calls per command (``INFO commandstats``), for the JSON.
    redis_commands: dict[str, int]

    @classmethod
    async def read(cls, run: Run, rds: aioredis.Redis) -> Counters:
        info = await rds.info("cpu")
        commands = await rds.info("commandstats")
        return cls(
            at=time.time(),
            server_cpu=process_cpu(run.server),
            server_rss=run.server.memory_info().rss,
            workers_cpu=run.infra.workers_cpu(),
            redis_cpu=float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            machine_busy=machine_busy(),
            bench_cpu=time.process_time(),
            redis_calls=sum(int(v["calls"]) for v in commands.values()),
            redis_xreads=int(commands.get("cmdstat_xread", {}).get("calls", 0)),
            redis_commands={
                k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in commands.items()
            },
        )


async def settle(run: Run) -> int:
    """Waits until the server has finished setting its clients up: idle for half a second
    with an unchanged number of Redis connections (the baseline opens each client's
    connection only after the response head is out). Returns that number."""
    limit = time.time() + 10 + run.clients / 200
    last, cpu = -1, process_cpu(run.server)
    while True:
        await asyncio.sleep(0.5)
        conns = await asyncio.to_thread(redis_connections, run.server, run.infra.redis_port)
        now_cpu = process_cpu(run.server)
        if (conns == last and now_cpu - cpu < 0.02) or time.time() > limit:
            return conns
        last, cpu = conns, now_cpu


@dataclass
class Samples:
    rss_peak: int = 0
    redis_conns: list[int] = field(default_factory=list)


async def sample(run: Run, samples: Samples, stop: asyncio.Event) -> None:
    """RSS every 0.25 s; Redis connections every 2 s (listing every socket of the machine
    is not free at thousands of clients, and it runs on the same cores)."""
    for tick in itertools.count():
        with contextlib.suppress(psutil.Error):
            samples.rss_peak = max(samples.rss_peak, run.server.memory_info().rss)
            if tick % 8 == 7:
                samples.redis_conns.append(
                    await asyncio.to_thread(redis_connections, run.server, run.infra.redis_port)
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)
            return


@dataclass(frozen=True)
class CancelSent:
    sent: float
    answered: float
    status: int


async def cancel_at(
    http: httpx.AsyncClient, gens: list[Generation], at: float
) -> dict[int, CancelSent]:
    """Cancels the generations meant for it at ``at``; returns when each POST was sent and
    answered (202: it was running; 200: it had already ended)."""
    await asyncio.sleep(max(0.0, at - time.time()))

    async def one(index: int, gen: Generation) -> tuple[int, CancelSent]:
        sent = time.time()
        response = await http.post(f"/v1/streams/{gen.id}/cancel")
        if response.status_code not in (200, 202):
            raise BenchError(f"cancel of {gen.id} answered {response.status_code}")
        return index, CancelSent(sent, time.time(), response.status_code)

    return dict(await asyncio.gather(*(one(i, g) for i, g in enumerate(gens) if g.to_cancel)))


async def create_probes(http: httpx.AsyncClient, cfg: Config, start: float) -> list[str]:
    """``--probes`` short generations over the live part of the run, at random moments so
    they do not fall into step with the workers' queue polling."""
    rng = random.Random(start)
    window = max(0.2, 0.8 * cfg.generation_seconds)
    ids = []
    for at in sorted(start + 0.2 + rng.uniform(0, window) for _ in range(cfg.probes)):
        await asyncio.sleep(max(0.0, at - time.time()))
        ids.append(await create(http, probe_body()))
    return ids


async def pickup_times(http: httpx.AsyncClient, api_url: str, ids: list[str]) -> list[float]:
    """Each probe's metadata ``t``: creation → its first event appended by a worker."""
    pickups = []
    async with asyncio.timeout(60):
        for stream_id in ids:
            events = await read_events(http, api_url, stream_id)
            if events and events[0]["event"] == "metadata":
                pickups.append(float(events[0]["t"]))
    return pickups


@dataclass
class Connected:
    gens: list[Generation]
    loadgens: list[LoadGen]
    deadline: float
    before: Counters
    connected: Counters
    connect_seconds: float
    redis_conns: int


async def connect_clients(
    run: Run, http: httpx.AsyncClient, rds: aioredis.Redis, loadgens: list[LoadGen]
) -> Connected:
    """Steps 1 and 2: generations created while the workers are paused, every client
    connected and the server settled. The caller resumes the workers."""
    cfg = run.cfg
    run.infra.pause_workers()
    gens = await create_generations(http, cfg)
    assignment = assign_clients(cfg, run.clients)
    before = await Counters.read(run, rds)
    connect_limit = cfg.connect_seconds(len(assignment))
    deadline = before.at + connect_limit + cfg.live_seconds(len(assignment))
    loadgens += await start_loadgens(cfg, run, gens, assignment, deadline)
    async with asyncio.timeout(connect_limit + 10):
        for lg in loadgens:
            lg.connected = await lg.read_line()
    connect_seconds = time.time() - before.at
    redis_conns = await settle(run)
    return Connected(
        gens,
        loadgens,
        deadline,
        before,
        await Counters.read(run, rds),
        connect_seconds,
        redis_conns,
    )


async def measure(run: Run) -> dict[str, Any]:
    """One scenario on one side; the steps are in the module docstring."""
    cfg, infra = run.cfg, run.infra
    loadgens: list[LoadGen] = []
    async with contextlib.AsyncExitStack() as stack:
        rds = aioredis.Redis.from_url(infra.redis_url)
        stack.push_async_callback(rds.aclose)
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=run.api_url, timeout=60))
        stack.callback(infra.resume_workers)  # never leave them paused
        stack.push_async_callback(stop_loadgens, loadgens)
        await warm_up(http, run.server_url)
        try:
            c = await connect_clients(run, http, rds, loadgens)
        finally:
            infra.resume_workers()
        samples = Samples(rss_peak=c.connected.server_rss, redis_conns=[c.redis_conns])
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(run, samples, stop))
        cancelling = asyncio.create_task(
            cancel_at(http, c.gens, c.connected.at + cfg.generation_seconds / 2)
        )
        probes = asyncio.create_task(create_probes(http, cfg, c.connected.at))
        async with asyncio.timeout(max(5.0, c.deadline - time.time()) + 30):
            for lg in c.loadgens:
                lg.done = await lg.read_line()
        end = await Counters.read(run, rds)
        stop.set()
        await sampler
        cancels = await cancelling
        pickups = await pickup_times(http, run.api_url, await probes)
        states = await final_states(http, c.gens)
        return figures(run, c, end, samples, cancels, pickups, states)


async def stop_loadgens(loadgens: list[LoadGen]) -> None:
    for lg in loadgens:
        await lg.stop()


# --------------------------------------------------------------------------------------------
# Figures


def figures(
    run: Run,
    c: Connected,
    end: Counters,
    samples: Samples,
    cancels: dict[int, CancelSent],
    pickups: list[float],
    states: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything one run measured, as the JSON keeps it and the table shows it."""
    done = [lg.done for lg in c.loadgens]
    events = sum(s["events"] for s in done)
    cancel = cancel_figures(done, cancels, states)
    return {
        **client_figures(run, c, done, cancel, states),
        **latency_figures(done, c.connected.at, events),
        **server_figures(c, end, samples, events),
        "pickup_p50_ms": percentile(pickups, 0.5),
        "pickup_p99_ms": percentile(pickups, 0.99),
        "pickup_ms": pickups,
        "cancel_p50_ms": percentile(cancel.latencies_ms, 0.5),
        "cancel_p99_ms": percentile(cancel.latencies_ms, 0.99),
        "cancel_ms": [round(x, 1) for x in cancel.latencies_ms],
        "cancel_post_p99_ms": percentile(cancel.post_ms, 0.99),
        "loadgen_procs": len(c.loadgens),
        "loadgen_reads": sum(s["reads"] for s in done),
        "loadgen_body_bytes": sum(s["body_bytes"] for s in done),
        "loadgen_cpu_connect": sum(lg.connected["cpu"] for lg in c.loadgens),
        "loadgen_cpu_stream": sum(lg.done["cpu"] - lg.connected["cpu"] for lg in c.loadgens),
        "loadgen_max_rss_mb": max(s["max_rss_kb"] for s in done) / 1024,
    }


def client_figures(
    run: Run,
    c: Connected,
    done: list[dict[str, Any]],
    cancel: CancelFigures,
    states: list[dict[str, Any]],
) -> dict[str, Any]:
    """What the clients saw, and whether the broker's final state agrees."""
    problems: Counter[str] = Counter()
    for summary in done:
        problems.update(summary["problems"])
    return {
        "clients": sum(s["clients"] for s in done),
        "clients_main": run.clients,
        "complete": sum(s["ok"] for s in done),
        "connected": sum(lg.connected["connected"] for lg in c.loadgens),
        "problems": dict(problems.most_common(10)),
        "clients_with_gaps": sum(s["clients_with_gaps"] for s in done),
        "cancel_watchers": cancel.watchers,
        "cancel_ok": cancel.ok,
        "cancel_late": cancel.late,
        "state_mismatches": state_mismatches(c.gens, states),
    }


def latency_figures(done: list[dict[str, Any]], t0: float, events: int) -> dict[str, Any]:
    hist: Counter[int] = Counter()
    for summary in done:
        hist.update({int(k): v for k, v in summary["latency_hist"].items()})
    last_receipt = max((s["last_receipt"] for s in done), default=0.0)
    live = last_receipt - t0 if last_receipt > t0 else None
    return {
        "latency_p50_ms": percentile_hist(hist, 0.5),
        "latency_p99_ms": percentile_hist(hist, 0.99),
        "latency_max_ms": max(hist) / BUCKETS_PER_MS if hist else None,
        "latency_samples": sum(hist.values()),
        "events": events,
        "live_seconds": live,
        "events_per_s": events / live if live else None,
    }


def server_figures(c: Connected, end: Counters, samples: Samples, events: int) -> dict[str, Any]:
    """The measured server, Redis, the workers and the machine; ``t0``: the workers resumed."""
    before, t0 = c.before, c.connected

    def per_1000(seconds: float) -> float | None:
        return seconds * 1000 / events if events else None

    clients = sum(lg.done["clients"] for lg in c.loadgens)
    wall = end.at - t0.at
    return {
        "connect_seconds": c.connect_seconds,
        "server_cpu_connect": t0.server_cpu - before.server_cpu,
        "server_cpu_stream": end.server_cpu - t0.server_cpu,
        "server_cpu_per_1000_events": per_1000(end.server_cpu - t0.server_cpu),
        "server_rss_before_mb": before.server_rss / 2**20,
        "server_rss_connected_mb": t0.server_rss / 2**20,
        "server_rss_peak_mb": samples.rss_peak / 2**20,
        "server_rss_per_conn_kb": (t0.server_rss - before.server_rss) / clients / 1024,
        "server_redis_conns_connected": c.redis_conns,
        "server_redis_conns_max": max(samples.redis_conns),
        "server_redis_conns_samples": samples.redis_conns,
        "redis_cpu_stream": end.redis_cpu - t0.redis_cpu,
        "redis_cpu_per_1000_events": per_1000(end.redis_cpu - t0.redis_cpu),
        "redis_calls_stream": end.redis_calls - t0.redis_calls,
        "redis_xreads_stream": end.redis_xreads - t0.redis_xreads,
        "redis_commands_stream": {
            k: n - t0.redis_commands.get(k, 0)
            for k, n in end.redis_commands.items()
            if n - t0.redis_commands.get(k, 0)
        },
        "workers_cpu_stream": end.workers_cpu - t0.workers_cpu,
        "machine_busy_pct": 100
        * (end.machine_busy - t0.machine_busy)
        / wall
        / (os.cpu_count() or 1),
        "bench_cpu_stream": end.bench_cpu - t0.bench_cpu,
        "others_cpu_stream": others_cpu(c, end),
    }


def others_cpu(c: Connected, end: Counters) -> float:
    """Busy CPU time of the machine that no process of the run spent: the machine may be
    shared, and a run next to a busy neighbour measures the neighbour too."""
    t0 = c.connected
    ours = sum(
        getattr(end, k) - getattr(t0, k)
        for k in ("server_cpu", "workers_cpu", "redis_cpu", "bench_cpu")
    )
    ours += sum(lg.done["cpu"] - lg.connected["cpu"] for lg in c.loadgens)
    return max(0.0, end.machine_busy - t0.machine_busy - float(ours))


def state_mismatches(gens: list[Generation], states: list[dict[str, Any]]) -> list[str]:
    """Generations whose final state is not what the fake model must have produced."""

    def wrong(gen: Generation, state: dict[str, Any]) -> bool:
        if gen.expected is None:  # cancelled, or completed when the cancel came too late
            return state["status"] not in ("cancelled", "completed")
        return bool(state["status"] != "completed" or state["text"] != gen.expected)

    return [g.id for g, s in zip(gens, states, strict=True) if wrong(g, s)]


@dataclass
class CancelFigures:
    #: Per watcher: POST sent → its ``done`` / ``cancelled`` received (ms).
    latencies_ms: list[float] = field(default_factory=list)
    #: Watchers that ended ``cancelled`` with exactly the text the broker kept.
    ok: int = 0
    #: Watchers of a generation that completed before the cancel took effect (the POST
    #: came too late: the api answered it after the end, or the worker finished first).
    late: int = 0
    watchers: int = 0
    post_ms: list[float] = field(default_factory=list)


def cancel_figures(
    done: list[dict[str, Any]], cancels: dict[int, CancelSent], states: list[dict[str, Any]]
) -> CancelFigures:
    figures = CancelFigures(post_ms=[(c.answered - c.sent) * 1000 for c in cancels.values()])
    for summary in done:
        for w in summary["watchers"]:
            figures.watchers += 1
            sent, state = cancels.get(w["stream"]), states[w["stream"]]
            same_text = w["ok"] and w["text"] == state["text"]
            if state["status"] == "completed" and w["terminal"] == "stop" and same_text:
                figures.late += 1
            elif state["status"] == "cancelled" and w["terminal"] == "cancelled" and same_text:
                figures.ok += 1
                if sent is not None and w["terminal_at"]:
                    figures.latencies_ms.append((w["terminal_at"] - sent.sent) * 1000)
    return figures


# --------------------------------------------------------------------------------------------
# Main


def child_env(cfg: Config, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["REDIS_URL"] = redis_url
    env["BROKER_HEARTBEAT_SECONDS"] = f"{cfg.heartbeat:g}"
    # Every generation of a run runs at once (with the probes): none may wait for a slot.
    jobs = cfg.streams + cfg.cancel_streams + cfg.probes + 10
    env.setdefault("BROKER_MAX_JOBS", str(max(100, math.ceil(jobs / cfg.worker_procs))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cfg.broker_dir), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_scenario(cfg: Config, infra: Infra, clients: int, logdir: Path) -> dict[str, Any]:
    """A fresh api (and baseline) process per scenario, so no figure carries over."""
    scenario: dict[str, Any] = {"clients": clients}
    servers: dict[str, tuple[str, Child]] = {}
    try:
        servers["broker"] = start_api(infra.procs, f"api-{clients}")
        if "baseline" in cfg.targets:
            servers["baseline"] = start_baseline(
                infra.procs, f"baseline-{clients}", infra.redis_url, cfg.heartbeat
            )
        for target in cfg.targets:
            url, child = servers[target]
            run = Run(
                cfg,
                infra,
                servers["broker"][0],
                target,
                url,
                child.serving_process(),
                clients,
                logdir,
            )
            print(f"… {clients:,} clients on the {target}", flush=True)
            try:
                with pinned(run.server, infra.server_core):
                    scenario[target] = asyncio.run(measure(run))
            except (BenchError, TimeoutError, httpx.HTTPError, psutil.Error) as exc:
                scenario[target] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"  {target} run failed: {scenario[target]['error']}", flush=True)
    finally:
        for _, child in servers.values():
            infra.procs.stop(child)
    return scenario


@contextlib.contextmanager
def pinned(server: psutil.Process, core: int | None) -> Iterator[None]:
    """With ``--pin``: the measured server alone on ``core`` for its run (``main`` has
    already moved this process, and so every child it starts, off that core)."""
    if core is None:
        yield
        return
    others = server.cpu_affinity()
    server.cpu_affinity([core])
    try:
        yield
    finally:
        with contextlib.suppress(psutil.Error):
            server.cpu_affinity(others)


def keep_last_core_free() -> int:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("fanout: --pin needs at least two cores")
    os.sched_setaffinity(0, cores[:-1])
    return cores[-1]


def preflight(cfg: Config, fd_limit: int) -> None:
    if not (cfg.broker_dir / "broker" / "__main__.py").is_file():
        raise SystemExit(f"fanout: {cfg.broker_dir} is not a streambroker source tree")
    if shutil.which("redis-server") is None:
        raise SystemExit("fanout: redis-server is not on PATH (apt-get install redis-server)")
    most = max(cfg.scenarios) + cfg.cancel_streams * cfg.cancel_watchers
    # The baseline holds a client socket and a Redis connection per client.
    needed = 2 * most + 200
    if needed > fd_limit:
        raise SystemExit(
            f"fanout: {most:,} clients need about {needed:,} open files in one server "
            f"process; the hard limit here is {fd_limit:,} (ulimit -Hn)"
        )


def start_infra(cfg: Config, procs: Processes, workdir: Path, fd_limit: int) -> Infra:
    (workdir / "redis").mkdir()
    redis_url, _ = start_redis(procs, workdir / "redis", maxclients=fd_limit - 100)
    procs.env = child_env(cfg, redis_url)
    workers = [
        procs.start(f"worker-{i}", [sys.executable, "-m", "broker", "worker"])
        for i in range(cfg.worker_procs)
    ]
    port = int(redis_url.rsplit(":", 1)[1].split("/", 1)[0])
    time.sleep(1)  # a worker that cannot start (bad tree, bad setting) exits at once
    for worker in workers:
        worker.check_alive()
    return Infra(procs, redis_url, port, workers)


def redis_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        info: dict[str, Any] = client.info("server")  # type: ignore[assignment]
        return str(info["redis_version"])
    finally:
        client.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the run as Ctrl-C does: every process, in order


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    # The broker's modules (the fake's text) come from the tree that is measured.
    sys.path.insert(0, str(cfg.broker_dir))
    fd_limit = raise_fd_limit()
    preflight(cfg, fd_limit)
    server_core = keep_last_core_free() if cfg.pin else None
    document: dict[str, Any] = {"benchmark": "fanout", "command": cfg.command}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fanout-")))
        (logdir := workdir / "logs").mkdir()
        procs = Processes(logdir, dict(os.environ), cfg.broker_dir)
        stack.callback(procs.stop_all)
        if cfg.keep_logs:
            stack.callback(keep_logs, logdir, cfg.out)
        infra = start_infra(cfg, procs, workdir, fd_limit)
        infra.server_core = server_core
        document |= {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine_info(redis_version(infra.redis_url)),
            "broker": {
                "dir": str(cfg.broker_dir),
                "label": cfg.label,
                **git_commit(cfg.broker_dir),
            },
            "config": cfg.as_json(),
            "scenarios": [],
        }
        print(header(document), flush=True)
        for clients in cfg.scenarios:
            document["scenarios"].append(run_scenario(cfg, infra, clients, logdir))
            print(
                "\n" + scenario_table(document["config"], document["scenarios"][-1]) + "\n",
                flush=True,
            )
    document["targets"] = check_targets(document["scenarios"])
    print(targets_table(document["targets"]))
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nwrote {display_path(cfg.out)}")
    if any("error" in s.get(t, {}) for s in document["scenarios"] for t in cfg.targets):
        return 1
    missed = any(c["pass"] is False for c in document["targets"])
    return 2 if cfg.check and missed else 0


def keep_logs(logdir: Path, out: Path) -> None:
    target = out.with_name(out.stem + "-logs")
    shutil.copytree(logdir, target, dirs_exist_ok=True)
    print(f"logs kept in {display_path(target)}")


def display_path(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("fanout: interrupted; every process it started has been stopped", file=sys.stderr)
        sys.exit(130)
    except BenchError as exc:  # a server that would not start: nothing left to measure
        print(f"fanout: {exc}", file=sys.stderr)
        sys.exit(1)
