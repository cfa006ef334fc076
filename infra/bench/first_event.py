"""Time to first event and first token of the ``fake`` model, through a running broker.

Each run is what a client does: ``POST /v1/streams``, then at once ``GET .../events``, read
until the terminal event. Four figures per run, all client-side wall clock from the moment the
POST starts, except the last:

- ``create``      — the 201 answer arrived;
- ``first event`` — the first complete SSE event (``metadata``) arrived;
- ``first token`` — the first complete ``token`` event arrived;
- ``server ttft`` — the broker's own ``time_to_first_token_ms`` (creation to the first token
  append, read from ``GET /v1/streams/{id}`` afterwards): the part spent inside the broker.

Runs are sequential, on one keep-alive client, after ``--warmup`` uncounted runs, each after a
random pause (``--pause-ms``): back-to-back runs would fall into step with the worker's queue
polling and measure its worst case every time instead of a real client's spread. The fake
emits its first token at once whatever its rate, so what is measured is the broker: enqueue,
arq pickup (``BROKER_JOB_POLL_SECONDS``), claim, the first appends and the blocking read.

    python infra/bench/first_event.py --start-dev            # starts and stops its own broker
    python infra/bench/first_event.py --url http://127.0.0.1:8000 --runs 50

Needs httpx (``pip install -e '.[test]'``). Exits 1 if any run fails.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parents[2]
FIGURES = ("create", "first event", "first token", "server ttft")


@dataclass
class Run:
    create_ms: float
    first_event_ms: float
    first_token_ms: float
    server_ttft_ms: float | None
    events: int
    last_type: str

    def figures(self) -> tuple[float | None, ...]:
        return (self.create_ms, self.first_event_ms, self.first_token_ms, self.server_ttft_ms)


class RunFailed(Exception):
    pass


def one_run(client: httpx.Client, base: str, body: dict[str, object], timeout: float) -> Run:
    start = time.perf_counter()

    def elapsed_ms() -> float:
        return (time.perf_counter() - start) * 1000

    created = client.post(f"{base}/v1/streams", json=body)
    create_ms = elapsed_ms()
    if created.status_code != 201:
        raise RunFailed(f"POST /v1/streams answered {created.status_code}: {created.text[:200]}")
    stream = created.json()
    first_event_ms = first_token_ms = math.nan
    events, kind = 0, ""
    deadline = time.monotonic() + timeout
    with client.stream("GET", base + stream["events_url"]) as response:
        if response.status_code != 200:
            raise RunFailed(f"GET events answered {response.status_code}")
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                raise RunFailed(f"stream {stream['id']} did not end within {timeout}s")
            if line.startswith("event:"):
                kind = line.partition(":")[2].strip()
            elif line == "" and kind:  # a blank line completes the event
                events += 1
                if math.isnan(first_event_ms):
                    first_event_ms = elapsed_ms()
                if kind == "token" and math.isnan(first_token_ms):
                    first_token_ms = elapsed_ms()
                if kind in ("done", "error"):
                    break
                kind = ""
    if kind != "done" or math.isnan(first_token_ms):
        raise RunFailed(f"stream {stream['id']} ended with {kind or 'nothing'!r}, no token seen")
    state = client.get(f"{base}{stream['url']}").json()
    return Run(
        create_ms,
        first_event_ms,
        first_token_ms,
        state.get("time_to_first_token_ms"),
        events,
        kind,
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: a value that was measured, no interpolation."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def report(runs: list[Run]) -> None:
    print(f"\n{'ms':<14}{'min':>9}{'median':>9}{'p90':>9}{'max':>9}")
    for i, name in enumerate(FIGURES):
        values = [v for r in runs if (v := r.figures()[i]) is not None]
        if not values:
            continue
        row = (min(values), statistics.median(values), percentile(values, 0.9), max(values))
        print(f"{name:<14}" + "".join(f"{v:9.1f}" for v in row))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def dev_broker(deadline_s: float, store: str) -> Iterator[str]:
    """``python -m broker dev`` on a free port, until /readyz answers; stopped with SIGINT."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "broker", "dev", "--port", str(port), "--store", store]
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_ready(process, base, log, deadline_s)
            store_line = next((x for x in _tail(log).splitlines() if "store:" in x), "")
            print(f"started: {' '.join(command[1:])}\n  {store_line.strip()}")
            yield base
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # a clean stop removes the embedded store
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-3000:]


def _wait_ready(
    process: subprocess.Popen[bytes], base: str, log: IO[bytes], deadline_s: float
) -> None:
    limit = time.monotonic() + deadline_s
    while True:
        if process.poll() is not None:
            raise SystemExit(f"broker dev exited with {process.returncode}:\n{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        if time.monotonic() > limit:
            raise SystemExit(f"broker dev not ready within {deadline_s}s:\n{_tail(log)}")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the broker to measure")
    parser.add_argument("--runs", type=int, default=20, help="measured runs (default 20)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted runs first (default 1)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per generation")
    parser.add_argument(
        "--tokens-per-second", type=float, default=1000.0, help="the fake model's rate"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="longest one run may take")
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=100.0,
        help="random pause of 0 to this many ms before each run (default 100), so that runs "
        "do not fall into step with the worker's queue polling",
    )
    parser.add_argument(
        "--start-dev", action="store_true", help="start `python -m broker dev` on a free port"
    )
    parser.add_argument(
        "--store",
        choices=["auto", "redis-server", "fakeredis"],
        default="auto",
        help="with --start-dev: the embedded store (default auto)",
    )
    parser.add_argument("--ready-deadline", type=float, default=30.0, help="seconds to /readyz")
    parser.add_argument("--verbose", action="store_true", help="print every run")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")
    body: dict[str, object] = {
        "model": "fake",
        "messages": [{"role": "user", "content": "How fast is the first token?"}],
        "max_tokens": args.max_tokens,
        "fake": {"tokens_per_second": args.tokens_per_second},
        "metadata": {"bench": "first_event"},
    }
    with contextlib.ExitStack() as stack:
        base = args.url.rstrip("/")
        if args.start_dev:
            base = stack.enter_context(dev_broker(args.ready_deadline, args.store))
        client = stack.enter_context(httpx.Client(timeout=args.timeout))
        print(
            f"broker {base}: {args.runs} runs after {args.warmup} warm-up, fake model, "
            f"{args.max_tokens} tokens at {args.tokens_per_second:g}/s"
        )
        runs: list[Run] = []
        failures = 0
        for i in range(args.warmup + args.runs):
            time.sleep(random.uniform(0, args.pause_ms) / 1000)
            try:
                run = one_run(client, base, body, args.timeout)
            except (RunFailed, httpx.HTTPError) as exc:
                failures += 1
                print(f"run {i + 1}: FAILED: {exc}")
                continue
            if i >= args.warmup:
                runs.append(run)
            if args.verbose:
                tag = "warm-up" if i < args.warmup else f"run {i + 1 - args.warmup}"
                shown = "  ".join(
                    f"{n} {'-' if v is None else f'{v:.1f}'}"
                    for n, v in zip(FIGURES, run.figures(), strict=True)
                )
                print(f"{tag:>8}: {shown}  ({run.events} events)")
        if runs:
            report(runs)
        print(f"\n{len(runs)} measured, {failures} failed")
        return 1 if failures or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
