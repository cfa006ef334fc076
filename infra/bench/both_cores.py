"""Fan-out on both cores: ``api --workers 2`` holding 10,000 clients, and a connect storm.

    python infra/bench/both_cores.py                  # 10,000 clients; storm of 5,000 on 1,000
    python infra/bench/both_cores.py --quick          # 200 clients; storm of 200 on 100

Each phase runs on fresh processes on free ports of 127.0.0.1 (a private ``redis-server``,
one ``python -m broker worker``, one ``python -m broker api --workers 2``), with
``BROKER_BATCH_MAX_AGE_MS=0`` so that each of the fake model's tokens is an event, and the
same C epoll load generator as ``nchan.py`` (``nchan/sse_loadgen.c``):

- **hold**: the worker is paused, one generation of ``--events`` tokens at ``--rate``/s is
  created, ``--clients`` clients connect (spread by the kernel over the two api processes),
  the worker resumes. A client is *complete* when it received exactly ``--events`` token
  events and the terminal ``done``. Latency is receipt time minus the worker's ``t`` stamp.
- **storm**: ``--live`` clients watch a generation of ``--storm-events`` tokens; after
  ``--storm-at`` seconds, ``--storm`` more clients connect at once with the ``Last-Event-ID``
  of the event produced a second before, as the clients of a front-end that went away come
  back and resume: each reads what it missed from Redis, then joins the live fan-out. The
  live clients' latency p99 is compared between the events before the storm and those
  produced while it lasts (its first
  ``--storm-window`` seconds); and shown for the events after it (from 2 s after the last
  storm client connected), when all ``--live`` + ``--storm`` clients are live readers.

Prints both phases' figures; ``--out`` keeps them as JSON. Needs gcc, redis-server, and psutil
and httpx in the Python that runs it. Where the two cores go is printed too: the api
processes, the worker, Redis and the load generators all share them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from fanout_procs import BenchError, Child, Processes, free_port, raise_fd_limit, start_redis
from fanout_procs import wait_until as wait_for
from fanout_report import git_commit, machine_info, percentile
from loadgen import epoch_ms
from nchan import LoadGen, broker_env, build_loadgen, create, generation_body, process_cpu

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass
class Args:
    clients: int
    events: int
    rate: float
    live: int
    storm: int
    storm_events: int
    storm_at: float
    storm_window: float
    out: Path | None
    keep: Path | None
    skip_hold: bool

    # What nchan.py's helpers read of their Config.
    batch_max_age_ms: float = 0.0


@dataclass
class Broker:
    url: str
    redis_port: int
    worker: Child
    api: Child
    http: httpx.Client

    def api_processes(self) -> list[psutil.Process]:
        return psutil.Process(self.api.pid).children(recursive=True)

    def stream(self, seed: int, events: int, rate: float, cfg: Args) -> tuple[str, list[str]]:
        """A generation that waits for the worker (paused); the load generator's arguments."""
        os.kill(self.worker.pid, signal.SIGSTOP)
        stream_id = create(self.http, generation_body(cfg, seed, events, rate))  # type: ignore[arg-type]
        created_ms = epoch_ms(self.http.get(f"/v1/streams/{stream_id}").json()["created_at"])
        argv = ["--port", self.url.rsplit(":", 1)[1], "--path", f"/v1/streams/{stream_id}/events"]
        argv += ["--match", "event: token", "--ts-key", '"t":', "--done", "event: done"]
        argv += ["--ts-base-ms", str(created_ms), "--expect", str(events), "--concurrency", "256"]
        return stream_id, argv


@contextlib.contextmanager
def broker(workdir: Path, name: str, cfg: Args) -> Iterator[Broker]:
    procs = Processes(workdir / "logs", dict(os.environ), REPO)
    try:
        (datadir := workdir / f"{name}-redis").mkdir()
        redis_url, _ = start_redis(procs, datadir, maxclients=1000)
        procs.env = broker_env(cfg, redis_url)  # type: ignore[arg-type]
        worker = procs.start(f"{name}-worker", [sys.executable, "-m", "broker", "worker"])
        port = free_port()
        argv = [sys.executable, "-m", "broker", "api", "--host", "127.0.0.1", "--port", str(port)]
        api = procs.start(f"{name}-api", [*argv, "--workers", "2"])
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url), api, name)
        with httpx.Client(base_url=url, timeout=30) as http:
            warm = create(http, generation_body(cfg, -1, 4, 1000.0))  # type: ignore[arg-type]
            if "event: done" not in http.get(f"/v1/streams/{warm}/events").text:
                raise BenchError("the warm-up generation did not end with done")
            yield Broker(url, int(redis_url.rsplit(":", 1)[1].split("/")[0]), worker, api, http)
    finally:
        procs.stop_all()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def hold(workdir: Path, loadgen: Path, cfg: Args) -> dict[str, Any]:
    with broker(workdir, "hold", cfg) as b:
        _, argv = b.stream(1, cfg.events, cfg.rate, cfg)
        apis = b.api_processes()
        rss0 = sum(p.memory_info().rss for p in apis)
        gen = LoadGen(
            loadgen,
            [*argv, "--clients", str(cfg.clients), "--timeout", "300"],
            workdir / "hold-loadgen.log",
            workdir / "hold.lat",
        )
        try:
            connected = gen.connected(120 + cfg.clients / 50)
            rss1 = sum(p.memory_info().rss for p in apis)
            cpu0 = sum(map(process_cpu, apis))
            os.kill(b.worker.pid, signal.SIGCONT)
            summary = gen.done(400)
            cpu1 = sum(map(process_cpu, apis))
            per_client = gen.latencies(cfg.clients)
        finally:
            gen.stop()
        every = sorted(v for lat in per_client for v in lat)
        return {
            "clients": cfg.clients,
            "connected": connected,
            "complete": summary["complete"],
            "latency_p50_ms": percentile(every, 0.5),
            "latency_p99_ms": percentile(every, 0.99),
            "latency_max_ms": every[-1] if every else None,
            "api_cpu_per_1000": (cpu1 - cpu0) * 1000 / max(1, summary["counted"]),
            "api_rss_per_conn_kb": (rss1 - rss0) / cfg.clients / 1024,
            "api_processes": len(apis),
        }


def storm(workdir: Path, loadgen: Path, cfg: Args) -> dict[str, Any]:
    with broker(workdir, "storm", cfg) as b:
        stream_id, argv = b.stream(2, cfg.storm_events, cfg.rate, cfg)
        live = LoadGen(
            loadgen,
            [*argv, "--clients", str(cfg.live), "--timeout", "300"],
            workdir / "live-loadgen.log",
            workdir / "live.lat",
        )
        storming: LoadGen | None = None
        try:
            live.connected(60)
            os.kill(b.worker.pid, signal.SIGCONT)
            started = time.monotonic()
            time.sleep(cfg.storm_at)
            # They were live on the front-end that went away: they hold all but the last
            # second or so of events (ids: 1 is the metadata, token k is k + 1).
            held = max(1, int((cfg.storm_at - 1) * cfg.rate))
            storm_argv = [*argv, "--clients", str(cfg.storm), "--timeout", "300"]
            storm_argv += [
                "--last-event-id",
                str(held),
                "--expect",
                str(cfg.storm_events + 1 - held),
            ]
            storming = LoadGen(
                loadgen, storm_argv, workdir / "storm-loadgen.log", workdir / "storm.lat"
            )
            storm_start = time.monotonic() - started
            storm_connected = storming.connected(120)
            live_summary = live.done(400)
            storm_summary = storming.done(400)
            per_client = live.latencies(cfg.live)
            # What each storm client was owed: the token events after the id it held, as
            # a client reading the finished stream from there gets them.
            body = b.http.get(
                f"/v1/streams/{stream_id}/events", headers={"Last-Event-ID": str(held)}
            ).text
            owed = body.count("event: token")
            exact = sum(1 for got in storming.latencies(cfg.storm) if len(got) == owed)
        finally:
            live.stop()
            if storming is not None:
                storming.stop()
    # A token event's index is when it was produced: index / rate seconds after the start.
    first = int(storm_start * cfg.rate)
    last = int((storm_start + cfg.storm_window) * cfg.rate)
    steady = sorted(v for lat in per_client for v in lat[int(cfg.rate) : first])
    during = sorted(v for lat in per_client for v in lat[first:last])
    # After it: every client is live, 1,000 + 5,000 of them; the fan-out's own steady state.
    settled = int((storm_start + storm_connected["seconds"] + 2) * cfg.rate)
    after = sorted(v for lat in per_client for v in lat[settled : cfg.storm_events - 4])
    steady_p99, during_p99 = percentile(steady, 0.99), percentile(during, 0.99)
    return {
        "live": cfg.live,
        "storm": cfg.storm,
        "live_complete": live_summary["complete"],
        # Reached the end (the terminal event): every client whose response did not fail.
        # Those that fell behind under load caught up with merged tokens (same text, fewer
        # events), so only the others have exactly one event per token ("exact").
        "storm_ended": cfg.storm - storm_summary["failed"] - storm_summary["no_terminal"],
        "storm_exact": exact,
        "storm_owed_events": owed,
        "storm_loadgen": storm_summary,
        "storm_connect_seconds": storm_connected["seconds"],
        "storm_started_s": storm_start,
        "storm_last_event_id": held,
        "steady_p99_ms": steady_p99,
        "storm_p99_ms": during_p99,
        "storm_max_ms": during[-1] if during else None,
        "ratio": during_p99 / steady_p99 if steady_p99 and during_p99 is not None else None,
        "after_p99_ms": percentile(after, 0.99),
        "after_samples": len(after),
    }


def parse_args(argv: list[str] | None) -> Args:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add = parser.add_argument
    add("--clients", type=int, default=10_000, help="clients of the hold phase (10,000)")
    add("--events", type=int, default=200, help="token events of the hold phase (200)")
    add("--rate", type=float, default=50.0, help="events per second (50)")
    add("--live", type=int, default=1_000, help="live clients of the storm phase (1,000)")
    add("--storm", type=int, default=5_000, help="clients that connect at once (5,000)")
    add("--storm-events", type=int, default=1800, help="token events of the storm phase (1,800)")
    add("--storm-at", type=float, default=4.0, help="seconds into the stream it comes (4)")
    add("--storm-window", type=float, default=4.0, help="seconds it is measured over (4)")
    add("--quick", action="store_true", help="a smoke test: 200 clients, storm of 200 on 100")
    add("--out", type=Path, help="write the figures to this JSON file too")
    add("--keep", type=Path, help="an empty directory to run in and keep (every log)")
    add("--skip-hold", action="store_true", help="run the storm phase only")
    a = parser.parse_args(argv)
    if a.quick:
        a.clients, a.live, a.storm, a.storm_events, a.storm_at = 200, 100, 200, 200, 1.5
        a.storm_window = 1.0
    return Args(
        a.clients,
        a.events,
        a.rate,
        a.live,
        a.storm,
        a.storm_events,
        a.storm_at,
        a.storm_window,
        a.out,
        a.keep,
        a.skip_hold,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    raise_fd_limit()
    document: dict[str, Any] = {
        "benchmark": "both_cores",
        "command": " ".join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info("-"),
        "broker": git_commit(REPO),
    }
    with tempfile.TemporaryDirectory(prefix="both-cores-") as tmp:
        workdir = cfg.keep or Path(tmp)
        (workdir / "logs").mkdir(exist_ok=True)
        loadgen = build_loadgen(workdir)
        if not cfg.skip_hold:
            document["hold"] = hold(workdir, loadgen, cfg)
            print(json.dumps({"hold": document["hold"]}, indent=1), flush=True)
        document["storm"] = storm(workdir, loadgen, cfg)
        print(json.dumps({"storm": document["storm"]}, indent=1), flush=True)
    if cfg.out is not None:
        cfg.out.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
