"""Fan-out beside nginx + nchan: the broker's api and nchan under one workload and one client.

    python infra/bench/nchan.py                          # 1,000 and 3,000 clients, 5 reps
    python infra/bench/nchan.py --quick                  # 50 clients, 1 rep: does it work
    python infra/bench/nchan.py --clients 1000 --reps 3

For each client count and rep, both systems run in turn (the order alternates between reps),
each on fresh processes on free ports of 127.0.0.1, stopped at the end (also on Ctrl-C):

- **broker**: a private ``redis-server``, one ``python -m broker worker`` and one ``python -m
  broker api --workers 1``, with ``BROKER_BATCH_MAX_AGE_MS=0`` (``--batch-max-age-ms``) so
  that the fake model's every token is an event of its own. After a warm-up generation, the
  worker is paused (SIGSTOP), one generation of the ``fake`` model is created (``--events``
  tokens at ``--rate`` per second), N clients connect to ``/v1/streams/{id}/events``, and
  the worker resumes (SIGCONT).
- **nchan**: ``nginx`` with Debian's ``libnginx-mod-nchan``, one worker process, the memory
  store (``nchan/nginx.conf.in``). N clients subscribe to ``/sub/<channel>`` as EventSource
  clients; then this script POSTs ``--events`` messages to ``/pub/<channel>`` at ``--rate``
  per second, pipelined on one keep-alive connection (the fake model's very token texts),
  and one final ``{"done":true}``.

The clients are one C program (``nchan/sse_loadgen.c``, epoll, built with ``gcc -O2`` into
a temp dir at start), the same for both. Latency is receipt time minus the moment the
producer handed the event over, stamped by the producer in whole ms on the same clock: the
broker's worker stamps every event with ``t`` (ms since the generation's ``created_at``)
just before its append call; the publisher here puts ``"ts"`` (ms since the epoch) in each
message just before its POST. infra/README.md says what each figure means.

Prints one table per client count (medians over the reps, their range, broker ÷ nchan) and
writes every run's figures to JSON (``--out``). Needs nginx, libnginx-mod-nchan, gcc,
redis-server, and psutil and httpx in the Python that runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import resource
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from fanout_procs import (
    BenchError,
    Child,
    Processes,
    free_port,
    raise_fd_limit,
    start_api,
    start_redis,
    tail,
    wait_until,
)
from fanout_report import git_commit, machine_info, percentile
from loadgen import epoch_ms
from nchan_report import render, summarize

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LOADGEN_SOURCE = HERE / "nchan" / "sse_loadgen.c"
NGINX_CONF = HERE / "nchan" / "nginx.conf.in"
NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")
SYSTEMS = ("broker", "nchan")


@dataclass(frozen=True)
class Config:
    clients: list[int]
    reps: int
    events: int
    rate: float
    batch_max_age_ms: float
    settle: float
    concurrency: int
    only: str | None
    out: Path
    keep_logs: bool
    py_spy: Path | None
    command: str

    def live_timeout(self, clients: int) -> float:
        """Longest the clients may wait for their terminal event once connected."""
        return 60 + 3 * self.events / self.rate + clients / 100

    def as_json(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "reps": self.reps,
            "events": self.events,
            "rate": self.rate,
            "batch_max_age_ms": self.batch_max_age_ms,
            "settle": self.settle,
            "concurrency": self.concurrency,
            "broker_env": {k: v for k, v in os.environ.items() if k.startswith("BROKER_")},
        }


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--clients", help="comma-separated client counts (1000,3000; --quick: 50)")
    add("--reps", type=int, help="runs of each system per client count (5; --quick: 1)")
    add("--events", type=int, help="token events per client (200; --quick: 40)")
    add("--rate", type=float, default=50.0, help="events per second (50)")
    add(
        "--batch-max-age-ms",
        type=float,
        default=0.0,
        help="the broker's BROKER_BATCH_MAX_AGE_MS: 0 makes every token an event, as every "
        "nchan message is one (0)",
    )
    add("--settle", type=float, default=1.0, help="seconds between connect and RSS read (1)")
    add("--concurrency", type=int, default=64, help="connects in flight at once (64)")
    add("--only", choices=SYSTEMS, help="measure one system only")
    add("--quick", action="store_true", help="a smoke test: 50 clients, 40 events, 1 rep")
    add("--out", type=Path, help="JSON file (infra/bench/results/nchan-<UTC time>.json)")
    add("--keep-logs", action="store_true", help="copy every process's log beside the JSON")
    add(
        "--py-spy",
        type=Path,
        help="py-spy binary: record the api during each broker run's live part (raw stacks "
        "in the -logs directory beside the JSON; sampling costs CPU: keep such runs apart)",
    )
    args = parser.parse_args(argv)
    clients = args.clients or ("50" if args.quick else "1000,3000")
    try:
        counts = [int(x.replace("_", "")) for x in clients.split(",")]
    except ValueError:
        parser.error(f"--clients takes comma-separated integers, not {clients!r}")
    reps = args.reps or (1 if args.quick else 5)
    events = args.events or (40 if args.quick else 200)
    if min(counts) < 1 or reps < 1 or events < 1 or args.rate <= 0:
        parser.error("--clients, --reps, --events and --rate must be positive")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Config(
        clients=counts,
        reps=reps,
        events=events,
        rate=args.rate,
        batch_max_age_ms=args.batch_max_age_ms,
        settle=args.settle,
        concurrency=args.concurrency,
        only=args.only,
        out=args.out or HERE / "results" / f"nchan-{stamp}.json",
        keep_logs=args.keep_logs,
        py_spy=args.py_spy,
        command=shlex.join(["python", *sys.argv]),
    )


# --------------------------------------------------------------------------------------------
# The load generator


def build_loadgen(workdir: Path) -> Path:
    binary = workdir / "sse_loadgen"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(binary), str(LOADGEN_SOURCE)],
        check=True,
        capture_output=True,
        text=True,
    )
    return binary


class LoadGen:
    """One ``sse_loadgen`` process: N clients of one system."""

    def __init__(self, binary: Path, argv: list[str], log: Path, out: Path) -> None:
        self.out = out
        self.log = log
        with log.open("ab") as stderr:
            self.popen = subprocess.Popen(
                [str(binary), *argv, "--out", str(out)],
                stdin=subprocess.PIPE,  # it exits when this closes
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=True,
            )

    def _line(self, limit_s: float) -> str:
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], limit_s)
        line = self.popen.stdout.readline() if ready else ""
        if not line:
            raise BenchError(f"the load generator gave no answer; its log:\n{tail(self.log)}")
        return line

    def connected(self, limit_s: float) -> dict[str, Any]:
        _, ok, failed, seconds, cpu = self._line(limit_s).split()
        return {"ok": int(ok), "failed": int(failed), "seconds": float(seconds), "cpu": float(cpu)}

    def done(self, limit_s: float) -> dict[str, Any]:
        summary: dict[str, Any] = json.loads(self._line(limit_s))
        self.popen.wait(10)
        return summary

    def latencies(self, clients: int) -> list[array[float]]:
        """Each client's latencies (ms), in the order its events came."""
        raw = self.out.read_bytes()
        counts = array("I")
        counts.frombytes(raw[: 4 * clients])
        values = array("f")
        values.frombytes(raw[4 * clients :])
        per_client, at = [], 0
        for count in counts:
            per_client.append(values[at : at + count])
            at += count
        return per_client

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


# --------------------------------------------------------------------------------------------
# One run


@dataclass
class Context:
    cfg: Config
    workdir: Path
    logdir: Path
    loadgen: Path


def process_cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def redis_connections(process: psutil.Process, redis_port: int) -> int:
    return sum(
        1
        for c in process.net_connections(kind="tcp")
        if c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED
    )


def measure(
    ctx: Context,
    name: str,
    clients: int,
    server: psutil.Process,
    argv: list[str],
    produce: Callable[[], dict[str, Any]],
    ours: list[psutil.Process],
    redis_port: int | None = None,
) -> dict[str, Any]:
    """Connects the clients, lets the producer go, and reads every figure of the run.
    ``ours``: every process of the run but the load generator (this one included), to tell
    how much of the machine's busy time went to something else."""
    cfg = ctx.cfg
    rss_before = server.memory_info().rss
    argv = [*argv, "--clients", str(clients), "--expect", str(cfg.events)]
    argv += ["--timeout", f"{cfg.live_timeout(clients):g}", "--concurrency", str(cfg.concurrency)]
    log, out = ctx.logdir / f"{name}-loadgen.log", ctx.workdir / f"{name}.lat"
    loadgen = LoadGen(ctx.loadgen, argv, log, out)
    try:
        connected = loadgen.connected(40 + clients / 50)
        if connected["ok"] != clients:
            raise BenchError(f"{connected['failed']} of {clients} clients could not connect")
        time.sleep(cfg.settle)
        rss_after = server.memory_info().rss
        conns = None if redis_port is None else redis_connections(server, redis_port)
        cpu0, t0, sys0 = process_cpu(server), time.monotonic(), server.cpu_times().system
        ours0, busy0 = sum(map(process_cpu, ours)), machine_busy()
        produced = produce()
        summary = loadgen.done(cfg.live_timeout(clients) + 30)
        cpu1, wall, sys1 = process_cpu(server), time.monotonic() - t0, server.cpu_times().system
        ours1, busy1 = sum(map(process_cpu, ours)), machine_busy()
        latencies = loadgen.latencies(clients)
    finally:
        loadgen.stop()
    return {
        **latency_figures(latencies, cfg.events),
        "clients": clients,
        "complete": summary["complete"],
        "loadgen": summary,
        "connect_seconds": connected["seconds"],
        "producer": produced,
        "live_seconds": wall,
        "server_cpu": cpu1 - cpu0,
        "server_cpu_system_share": (sys1 - sys0) / (cpu1 - cpu0) if cpu1 > cpu0 else None,
        "server_cpu_per_1000": (cpu1 - cpu0) * 1000 / max(1, summary["counted"]),
        "server_cpu_per_1000_all": (cpu1 - cpu0) * 1000 / max(1, summary["events"]),
        "loadgen_cpu": summary["cpu_end"] - summary["cpu_connected"],
        "loadgen_cpu_per_1000": (summary["cpu_end"] - summary["cpu_connected"])
        * 1000
        / max(1, summary["counted"]),
        "rss_before_mb": rss_before / 2**20,
        "rss_per_conn_kb": (rss_after - rss_before) / clients / 1024,
        "redis_conns": conns,
        "machine_busy_pct": 100 * (busy1 - busy0) / wall / (os.cpu_count() or 1),
        "others_cpu": max(
            0.0,
            busy1 - busy0 - (ours1 - ours0) - (summary["cpu_end"] - summary["cpu_connected"]),
        ),
    }


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores, all processes)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def latency_figures(per_client: list[array[float]], expected: int) -> dict[str, Any]:
    """Percentiles over every counted event of every client; and over each client's last 4
    events against its middle ones (index ≥ 10 and < expected - 4)."""
    every = sorted(v for lat in per_client for v in lat)
    tail4 = sorted(v for lat in per_client for v in lat[max(0, expected - 4) :])
    middle = sorted(v for lat in per_client for v in lat[10 : max(10, expected - 4)])
    return {
        "latency_p50_ms": percentile(every, 0.5),
        "latency_p99_ms": percentile(every, 0.99),
        "latency_max_ms": every[-1] if every else None,
        "latency_min_ms": every[0] if every else None,
        "latency_samples": len(every),
        "middle_p99_ms": percentile(middle, 0.99),
        "last4_p99_ms": percentile(tail4, 0.99),
    }


# --------------------------------------------------------------------------------------------
# The broker


def broker_env(cfg: Config, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["REDIS_URL"] = redis_url
    env["BROKER_BATCH_MAX_AGE_MS"] = f"{cfg.batch_max_age_ms:g}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def generation_body(cfg: Config, seed: int, tokens: int, rate: float) -> dict[str, Any]:
    return {
        "model": "fake",
        "messages": [{"role": "user", "content": f"nchan benchmark, generation {seed}"}],
        "max_tokens": tokens,
        "fake": {"tokens_per_second": rate, "seed": seed},
        "metadata": {"bench": "nchan"},
    }


def create(http: httpx.Client, body: dict[str, Any]) -> str:
    response = http.post("/v1/streams", json=body)
    if response.status_code != 201:
        raise BenchError(f"POST /v1/streams answered {response.status_code}: {response.text}")
    stream_id: str = response.json()["id"]
    return stream_id


def run_broker(ctx: Context, clients: int, rep: int) -> dict[str, Any]:
    cfg, name = ctx.cfg, f"broker-{clients}-{rep}"
    procs = Processes(ctx.logdir, dict(os.environ), REPO)
    try:
        (datadir := ctx.workdir / f"{name}-redis").mkdir()
        redis_url, _ = start_redis(procs, datadir, maxclients=1000)
        redis_port = int(redis_url.rsplit(":", 1)[1].split("/", 1)[0])
        procs.env = broker_env(cfg, redis_url)
        worker = procs.start(f"{name}-worker", [sys.executable, "-m", "broker", "worker"])
        url, api = start_api(procs, f"{name}-api")
        with httpx.Client(base_url=url, timeout=30) as http:
            # Warm-up: imports, pools and the worker's first job before anything is measured.
            warm = create(http, generation_body(cfg, -1, 4, 1000.0))
            if "event: done" not in http.get(f"/v1/streams/{warm}/events").text:
                raise BenchError("the warm-up generation did not end with done")
            worker.check_alive()
            os.kill(worker.pid, signal.SIGSTOP)  # its generation waits, with no event, till...
            stream_id = create(http, generation_body(cfg, rep, cfg.events, cfg.rate))
            created_ms = epoch_ms(http.get(f"/v1/streams/{stream_id}").json()["created_at"])
            argv = ["--port", url.rsplit(":", 1)[1], "--path", f"/v1/streams/{stream_id}/events"]
            argv += ["--match", "event: token", "--ts-key", '"t":', "--done", "event: done"]
            argv += ["--ts-base-ms", str(created_ms)]
            worker_proc = psutil.Process(worker.pid)
            worker_cpu = process_cpu(worker_proc)

            server = api.serving_process()
            profiler: list[subprocess.Popen[bytes]] = []

            def resume() -> dict[str, Any]:
                if cfg.py_spy is not None:
                    profiler.append(start_py_spy(cfg, server.pid, name))
                os.kill(worker.pid, signal.SIGCONT)  # ...here
                return {}

            ours = [psutil.Process(c.pid) for c in procs.children] + [psutil.Process()]
            result = measure(ctx, name, clients, server, argv, resume, ours, redis_port)
            for p in profiler:
                p.wait(60)
            result["producer"] = {"worker_cpu": process_cpu(worker_proc) - worker_cpu}
            result["final_status"] = http.get(f"/v1/streams/{stream_id}").json()["status"]
        return result
    finally:
        procs.stop_all()


def start_py_spy(cfg: Config, pid: int, name: str) -> subprocess.Popen[bytes]:
    """Samples the api for the generation's duration, into collapsed stacks."""
    (logs := cfg.out.with_name(f"{cfg.out.stem}-logs")).mkdir(parents=True, exist_ok=True)
    out = logs / f"{name}.pyspy.txt"  # *-logs/ stays out of git
    seconds = max(1, int(cfg.events / cfg.rate))
    argv = [str(cfg.py_spy), "record", "-p", str(pid), "-d", str(seconds), "-r", "200"]
    return subprocess.Popen(
        [*argv, "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


# --------------------------------------------------------------------------------------------
# nginx + nchan


def nginx_conf(prefix: Path, port: int, buffer: int) -> Path:
    text = NGINX_CONF.read_text()
    user = "user root;" if os.geteuid() == 0 else ""  # a root master would run workers as nobody
    # The open-file limit this process raised (raise_fd_limit) and nginx inherits.
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    values = {"PREFIX": prefix, "PORT": port, "BUFFER": buffer, "NOFILE": nofile}
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    conf = prefix / "nginx.conf"
    conf.write_text(text.replace("@USER@", user))
    return conf


class Publisher:
    """POSTs the messages to nchan on one keep-alive connection, paced against the start
    time as the fake model paces its tokens, **without waiting for the answers**: nchan
    answers a POST once it has written the message to every subscriber, so a publisher that
    waited would fall behind its pace under load and stamp later messages late, hiding the
    queueing from the latency. The requests are pipelined; a thread reads the answers (the
    broker's worker is decoupled from the api's fan-out the same way, through Redis)."""

    def __init__(self, port: int, channel: str, texts: list[str], rate: float) -> None:
        self.port = port
        self.channel = channel
        self.texts = texts
        self.rate = rate

    def request(self, channel: str, body: dict[str, Any]) -> bytes:
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        head = (
            f"POST /pub/{channel} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        return head.encode() + data

    def warm_up(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", "/pub/warmup", b'{"text":"warm-up"}')
            conn.getresponse().read()
        finally:
            conn.close()

    def run(self) -> dict[str, Any]:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent: list[float] = []
        answers: list[tuple[int, float]] = []
        reader = threading.Thread(
            target=read_answers, args=(sock, len(self.texts) + 1, answers), daemon=True
        )
        reader.start()
        late_ms = 0.0
        try:
            start = time.monotonic()
            for i, text in enumerate(self.texts):
                due = start + i / self.rate
                if due - time.monotonic() > 0.0005:
                    time.sleep(due - time.monotonic())
                late_ms = max(late_ms, (time.monotonic() - due) * 1000)
                # "ts" last, as the broker's "t": whole ms since the epoch, as created_at + t.
                body = {"text": text, "tokens": 1, "ts": int(time.time() * 1000)}
                sent.append(time.monotonic())
                sock.sendall(self.request(self.channel, body))
            sent.append(time.monotonic())
            sock.sendall(self.request(self.channel, {"done": True, "ts": int(time.time() * 1000)}))
            reader.join(60)
        finally:
            sock.close()
        statuses = [status for status, _ in answers]
        if len(statuses) != len(sent) or set(statuses[:-1]) != {201}:
            # 202: no subscriber had the message
            raise BenchError(f"publishing answered {dict(Counter(statuses))} of {len(sent)}")
        answer_ms = [(at - sent[i]) * 1000 for i, (_, at) in enumerate(answers)]
        return {
            "answer_p50_ms": percentile(answer_ms, 0.5),
            "answer_p99_ms": percentile(answer_ms, 0.99),
            "publisher_late_max_ms": late_ms,
        }


def read_answers(sock: socket.socket, count: int, answers: list[tuple[int, float]]) -> None:
    """The status and arrival time of each of ``count`` pipelined answers, in order."""
    buffer = b""
    with contextlib.suppress(OSError):
        while len(answers) < count:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                continue
            head = buffer[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            while len(buffer) < end + 4 + length:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
            answers.append((int(head.split(" ", 2)[1]), time.monotonic()))
            buffer = buffer[end + 4 + length :]


def nginx_worker(master: Child) -> psutil.Process:
    """The single worker process of the nginx master."""
    kids = psutil.Process(master.pid).children()
    if len(kids) != 1:
        raise BenchError(f"nginx has {len(kids)} child processes, not one worker")
    return kids[0]


def fake_texts(cfg: Config, seed: int) -> list[str]:
    """The tokens the broker's fake model streams for the same generation."""
    from workers.providers.fake import fake_tokens

    body = generation_body(cfg, seed, cfg.events, cfg.rate)
    return fake_tokens(body["messages"], cfg.events, seed)


def run_nchan(ctx: Context, clients: int, rep: int) -> dict[str, Any]:
    cfg, name = ctx.cfg, f"nchan-{clients}-{rep}"
    (prefix := ctx.workdir / name).mkdir()
    port = free_port()
    conf = nginx_conf(prefix, port, buffer=cfg.events + 10)
    procs = Processes(ctx.logdir, dict(os.environ), prefix)
    try:
        argv = ["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
        master = procs.start(name, argv)
        url = f"http://127.0.0.1:{port}/healthz"
        wait_until(lambda: httpx.get(url, timeout=1).status_code == 200, master, "nginx")
        channel = f"n{clients}r{rep}"
        publisher = Publisher(port, channel, fake_texts(cfg, rep), cfg.rate)
        publisher.warm_up()
        argv = ["--port", str(port), "--path", f"/sub/{channel}"]
        argv += ["--ts-key", '"ts":', "--done", '"done":true']
        server = nginx_worker(master)
        ours = [psutil.Process(master.pid), server, psutil.Process()]
        result = measure(ctx, name, clients, server, argv, publisher.run, ours)
        errors = tail(prefix / "error.log", 4000)
        result["error_log"] = errors[-1000:] if "[error]" in errors or "[crit]" in errors else ""
        return result
    finally:
        procs.stop_all()
        with contextlib.suppress(OSError):
            shutil.copy(prefix / "error.log", ctx.logdir / f"{name}-error.log")


# --------------------------------------------------------------------------------------------
# Main


def preflight() -> None:
    missing = [p for p in ("nginx", "gcc", "redis-server") if shutil.which(p) is None]
    if missing:
        raise SystemExit(f"nchan: not on PATH: {', '.join(missing)}")
    if not NCHAN_MODULE.is_file():
        raise SystemExit(f"nchan: no {NCHAN_MODULE} (apt-get install libnginx-mod-nchan)")


def versions() -> dict[str, str]:
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    nchan = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-nchan"],
        capture_output=True,
        text=True,
        check=False,
    )
    gcc = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True, check=False)
    redis = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    )
    return {
        "redis": redis.stdout.split()[2].removeprefix("v=") if redis.stdout else "-",
        "nginx": nginx.stderr.strip().rpartition("/")[2],
        "libnginx-mod-nchan": nchan.stdout.strip(),
        "gcc": gcc.stdout.strip(),
        "kernel": os.uname().release,
    }


def one_run(ctx: Context, system: str, clients: int, rep: int) -> dict[str, Any]:
    print(f"… {clients:,} clients on {system}, rep {rep + 1}/{ctx.cfg.reps}", flush=True)
    try:
        run = (run_broker if system == "broker" else run_nchan)(ctx, clients, rep)
    except (BenchError, httpx.HTTPError, psutil.Error, OSError, subprocess.SubprocessError) as e:
        run = {"error": f"{type(e).__name__}: {e}"}
        print(f"  failed: {run['error']}", flush=True)
    else:
        print(
            f"  complete {run['complete']}/{clients}, p50 {run['latency_p50_ms']:.1f} ms, "
            f"p99 {run['latency_p99_ms']:.1f} ms, max {run['latency_max_ms']:.1f} ms, "
            f"CPU/1k {run['server_cpu_per_1000']:.4f} s, RSS/conn {run['rss_per_conn_kb']:.1f} KB,"
            f" loadgen CPU/1k {run['loadgen_cpu_per_1000']:.4f} s",
            flush=True,
        )
    return {"system": system, "clients": clients, "rep": rep, **run}


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.path.insert(0, str(REPO))  # the fake model's texts
    preflight()
    raise_fd_limit()
    systems = (cfg.only,) if cfg.only else SYSTEMS
    document: dict[str, Any] = {
        "benchmark": "nchan",
        "command": cfg.command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {**machine_info("-"), **versions()},  # versions() has Redis's
        "broker": git_commit(REPO),
        "config": cfg.as_json(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="nchan-bench-") as tmp:
        workdir = Path(tmp)
        (logdir := workdir / "logs").mkdir()
        ctx = Context(cfg, workdir, logdir, build_loadgen(workdir))
        try:
            for clients in cfg.clients:
                for rep in range(cfg.reps):
                    order = systems if rep % 2 == 0 else tuple(reversed(systems))
                    for system in order:
                        document["runs"].append(one_run(ctx, system, clients, rep))
                        save(cfg.out, document)
                print("\n" + render(document, clients) + "\n", flush=True)
        finally:
            if cfg.keep_logs:
                keep = cfg.out.with_name(cfg.out.stem + "-logs")
                shutil.copytree(logdir, keep, dirs_exist_ok=True)
    document["summary"] = summarize(document)
    save(cfg.out, document)
    print(f"wrote {cfg.out}")
    return 1 if any("error" in r for r in document["runs"]) else 0


def save(out: Path, document: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=1) + "\n")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("nchan: interrupted; every process it started has been stopped", file=sys.stderr)
        sys.exit(130)
