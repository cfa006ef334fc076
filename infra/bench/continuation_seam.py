"""The pause at the seam of a continued generation: a worker stopped (SIGTERM) or killed
(SIGKILL) mid-answer, another continuing the same stream.

    python infra/bench/continuation_seam.py                 # 10 SIGTERM and 10 SIGKILL runs
    python infra/bench/continuation_seam.py --runs 20 --lease 5 --sweep 1

Fresh processes on free ports of 127.0.0.1: a private ``redis-server``, one api, two
workers (``python -m broker ...``), with ``BROKER_LEASE_SECONDS`` / ``BROKER_SWEEP_SECONDS``
as given (a killed worker is noticed about a lease plus a sweep after it stopped writing; a
stopped one hands over at once). Each run creates one fake generation, reads it over SSE,
and after ``--after`` tokens signals the worker writing it (its pid is in the generation's
meta hash), then starts a replacement worker while the other one continues the stream.

Two figures per seam: the *reader's* pause, from the arrival of the last event before the
``resumed`` event to the arrival of the first token after it (what a user sees), and the
*log's*, the same span in the events' own ``t`` stamps (what
``streambroker_continuation_seam_seconds`` observes). Each run also checks that the text is
exactly an uninterrupted run's, with one ``resumed`` event and one ``done``. Prints the
median and the maximum for each signal; ``--out`` keeps the runs as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from fanout_procs import BenchError, Processes, start_api, start_redis, wait_until
from fanout_report import git_commit, machine_info

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from workers.providers.fake import fake_tokens  # noqa: E402

MESSAGES = [{"role": "user", "content": "continuation seam benchmark"}]


@dataclass
class Seam:
    signal: str
    reader_ms: float
    log_ms: int
    after_event_id: int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per signal")
    parser.add_argument("--lease", type=float, default=1.0, help="BROKER_LEASE_SECONDS")
    parser.add_argument("--sweep", type=float, default=0.2, help="BROKER_SWEEP_SECONDS")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per generation")
    parser.add_argument("--rate", type=float, default=60.0, help="fake tokens per second")
    parser.add_argument("--after", type=int, default=20, help="tokens read before the signal")
    parser.add_argument("--out", type=Path, help="write the runs as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sb-seam-") as workdir:
        seams = run(args, Path(workdir))
    report(args, seams)


def run(args: argparse.Namespace, workdir: Path) -> list[Seam]:
    procs = Processes(workdir, dict(os.environ), REPO)
    try:
        (datadir := workdir / "redis").mkdir()
        redis_url, _ = start_redis(procs, datadir, maxclients=1000)
        procs.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "BROKER_LEASE_SECONDS": f"{args.lease:g}",
            "BROKER_SWEEP_SECONDS": f"{args.sweep:g}",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
        }
        store = redis.Redis.from_url(redis_url)
        args.redis_version = store.info()["redis_version"]
        url, _ = start_api(procs, "api")
        workers = [start_worker(procs, f"worker-{n}") for n in range(2)]
        seams: list[Seam] = []
        with httpx.Client(base_url=url, timeout=30) as http:
            for n, sig in enumerate([signal.SIGTERM] * args.runs + [signal.SIGKILL] * args.runs):
                seams.append(one_run(args, http, store, sig, seed=n))
                workers = [w for w in workers if w.popen.poll() is None]
                workers.append(start_worker(procs, f"worker-{len(seams) + 2}"))
                print(f"{signal.Signals(sig).name} run {n % args.runs + 1}: {seams[-1]}")
        return seams
    finally:
        procs.stop_all()


def start_worker(procs: Processes, name: str) -> Any:
    child = procs.start(name, [sys.executable, "-m", "broker", "worker"])
    wait_until(lambda: "Starting worker" in child.tail(), child, name)
    return child


def one_run(
    args: argparse.Namespace, http: httpx.Client, store: redis.Redis, sig: int, seed: int
) -> Seam:
    body = {
        "model": "fake",
        "messages": MESSAGES,
        "max_tokens": args.tokens,
        "fake": {"tokens_per_second": args.rate, "seed": seed},
    }
    created = http.post("/v1/streams", json=body)
    if created.status_code != 201:
        raise BenchError(f"create answered {created.status_code}: {created.text}")
    stream_id = created.json()["id"]
    arrivals: list[tuple[float, str, dict[str, Any]]] = []
    signalled = False
    with http.stream("GET", f"/v1/streams/{stream_id}/events") as response:
        kind = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                arrivals.append((time.monotonic(), kind, json.loads(line[len("data: ") :])))
                tokens = sum(1 for _, k, _ in arrivals if k == "token")
                if not signalled and tokens >= args.after:
                    os.kill(writer_pid(store, stream_id), sig)
                    signalled = True
                if kind in ("done", "error"):
                    break
    return check_and_measure(args, arrivals, signal.Signals(sig).name, seed)


def writer_pid(store: redis.Redis, stream_id: str) -> int:
    worker = store.hget(f"sb:{{{stream_id}}}:meta", "worker")
    return int((worker or b"").decode().split(":")[1])


def check_and_measure(
    args: argparse.Namespace, arrivals: list[tuple[float, str, dict[str, Any]]], sig: str, seed: int
) -> Seam:
    kinds = [kind for _, kind, _ in arrivals]
    text = "".join(data["text"] for _, kind, data in arrivals if kind == "token")
    expected = "".join(fake_tokens(MESSAGES, args.tokens, seed))  # type: ignore[arg-type]
    if text != expected or kinds.count("resumed") != 1 or kinds[-1] != "done":
        raise BenchError(f"{sig} seed {seed}: not one exact continued answer: {kinds}")
    at = kinds.index("resumed")
    first_after = next(i for i in range(at, len(kinds)) if kinds[i] == "token")
    before, after = arrivals[at - 1], arrivals[first_after]
    return Seam(
        signal=sig,
        reader_ms=round((after[0] - before[0]) * 1000, 1),
        log_ms=after[2]["t"] - before[2]["t"],
        after_event_id=arrivals[at][2]["after_event_id"],
    )


def report(args: argparse.Namespace, seams: list[Seam]) -> None:
    print(f"\nlease {args.lease:g} s, sweep {args.sweep:g} s, {args.rate:g} tokens/s")
    for sig in ("SIGTERM", "SIGKILL"):
        runs = [s for s in seams if s.signal == sig]
        reader = [s.reader_ms for s in runs]
        log = [s.log_ms for s in runs]
        print(
            f"{sig}: {len(runs)} runs; reader's pause median {statistics.median(reader):.0f} ms, "
            f"max {max(reader):.0f} ms; log's median {statistics.median(log):.0f} ms, "
            f"max {max(log)} ms"
        )
    if args.out:
        payload = {
            "commit": git_commit(REPO),
            "machine": machine_info(args.redis_version),
            "args": {k: str(v) for k, v in vars(args).items()},
            "seams": [asdict(s) for s in seams],
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
