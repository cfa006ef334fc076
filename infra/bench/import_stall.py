"""Does a large import stall the api process? One big ``POST /v1/streams/import`` while
``/healthz`` is polled.

    python infra/bench/import_stall.py                 # a 64 MiB archive, three runs
    python infra/bench/import_stall.py --mib 8 --runs 1

It starts a private ``redis-server`` (temp dir, no persistence) and ``python -m broker api``
on free ports of 127.0.0.1, generates a finished stream's archive in the export format
(``broker/archive.py``) just under the size given, then per run: a thread polls ``/healthz``
every ``--poll-ms`` while the archive is imported (each run under a fresh id). Per run it
prints the worst ``/healthz`` latency seen during the import (what every SSE client of the
process would feel as a stall), the import's duration and the api process's peak RSS so far
(``VmHWM`` of ``/proc/<pid>/status``: the high-water mark, so later runs show the worst of
all runs). Needs httpx and redis-server on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from broker.state import new_stream_id  # noqa: E402

WORDS = ["the", "a", "durable", "log", "streams", "tokens", "to", "every", "reader", "asks"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the api exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer in {timeout}s")


@contextmanager
def broker() -> Iterator[tuple[str, int]]:
    """``(api url, api pid)`` of a fresh redis-server and api, stopped afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    workdir = Path(tempfile.mkdtemp(prefix="sb-import-bench-"))
    redis_port, api_port = free_port(), free_port()
    redis = subprocess.Popen(
        [
            binary,
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env |= {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "PYTHONUNBUFFERED": "1"}
    log = (workdir / "api.log").open("wb")
    api = subprocess.Popen(
        [sys.executable, "-m", "broker", "api", "--host", "127.0.0.1", "--port", str(api_port)],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{api_port}"
    try:
        wait_for(f"{url}/readyz", api)
        yield url, api.pid
    finally:
        for process in (api, redis):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def archive(limit: int, words_per_event: int) -> bytes:
    """A completed stream of the fake model as an export: one metadata event, token events
    of ``words_per_event`` words (a worker's batch), a progress event every 50, ``done``;
    as many as fit in ``limit`` bytes."""
    created = int(time.time() * 1000) - 60_000
    stream_id = new_stream_id(created)
    lines: list[bytes] = []
    texts: list[str] = []
    size, seq, tokens, t = 0, 0, 0, 0

    def add(event: str, data: dict[str, object]) -> None:
        nonlocal size, seq
        seq += 1
        line = json.dumps({"id": seq, "event": event, "t": t, "data": data}) + "\n"
        lines.append(line.encode())
        size += len(line)

    add(
        "metadata",
        {
            "id": stream_id,
            "model": "fake",
            "created_at": "2026-01-01T00:00:00.000Z",
            "attempt": 1,
            "metadata": {},
        },
    )
    budget = limit - 4096  # the header's fields and the final event
    i = 0
    while True:
        text = "".join(" " + WORDS[(i + k) % len(WORDS)] for k in range(words_per_event))
        # The event's line and the same text again in the header.
        if size + 2 * len(text) + 80 > budget:
            break
        t += 1
        tokens += words_per_event
        texts.append(text)
        add("token", {"text": text, "tokens": words_per_event})
        size += len(text)
        i += 1
        if i % 50 == 0:
            add(
                "progress",
                {
                    "tokens": tokens,
                    "tokens_per_second": 1000.0,
                    "estimated_total": None,
                    "percent": None,
                    "eta_ms": None,
                },
            )
    usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": tokens + 5}
    add("done", {"finish_reason": "stop", "usage": usage})
    meta = {
        "id": stream_id,
        "model": "fake",
        "status": "completed",
        "created_at_ms": str(created),
        "request": json.dumps({"model": "fake", "messages": []}),
        "tenant": "",
        "metadata": "{}",
        "attempt": "1",
        "last_seq": str(seq),
        "worker": "bench",
        "started_at_ms": str(created + 1),
        "first_token_at_ms": str(created + 2),
        "finished_at_ms": str(created + t + 10),
        "finish_reason": "stop",
        "usage": json.dumps(usage, separators=(",", ":")),
    }
    header = {"format": "streambroker.stream", "version": 1, "id": stream_id, "meta": meta}
    header["text"] = "".join(texts)
    return json.dumps(header).encode() + b"\n" + b"".join(lines)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_once(url: str, pid: int, body: bytes, poll_s: float) -> dict[str, float]:
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                began = time.perf_counter()
                client.get(f"{url}/healthz").raise_for_status()
                latencies.append(time.perf_counter() - began)
                time.sleep(poll_s)

    poller = threading.Thread(target=poll)
    rss_before = current_rss_mb(pid)
    poller.start()
    time.sleep(0.2)  # the poller is in its stride before the import starts
    began = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/streams/import",
        content=body,
        headers={"Content-Type": "application/x-ndjson"},
        timeout=300,
    )
    duration = time.perf_counter() - began
    stop.set()
    poller.join(60)
    if response.status_code != 201:
        raise SystemExit(f"the import answered {response.status_code}: {response.text[:500]}")
    return {
        "healthz_worst_ms": max(latencies) * 1000,
        "healthz_answers": len(latencies),
        "import_s": duration,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(pid),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=64, help="archive size (default 64)")
    parser.add_argument("--words-per-event", type=int, default=8, help="text per token event")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--poll-ms", type=float, default=10)
    args = parser.parse_args()
    limit = int(args.mib * 1024 * 1024)
    body = archive(limit, args.words_per_event)
    first = json.loads(body[: body.index(b"\n")])
    stream_id, created = first["id"], int(first["meta"]["created_at_ms"])
    events = body.count(b"\n") - 1
    print(
        f"archive: {len(body) / 2**20:.1f} MiB, {events} events, "
        f"header text {len(first['text']) / 2**20:.1f} MiB",
        flush=True,
    )
    del first
    with broker() as (url, pid):
        for run in range(1, args.runs + 1):
            fresh = new_stream_id(created)
            fresh_body = body.replace(stream_id.encode(), fresh.encode())
            figures = run_once(url, pid, fresh_body, args.poll_ms / 1000)
            print(
                f"run {run}: /healthz worst {figures['healthz_worst_ms']:.0f} ms "
                f"({figures['healthz_answers']} answers), import {figures['import_s']:.2f} s, "
                f"api RSS {figures['rss_before_mb']:.0f} MB before, "
                f"peak {figures['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
