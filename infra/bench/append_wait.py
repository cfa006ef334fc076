"""What waiting for a replica costs each append (``BROKER_APPEND_WAIT_REPLICAS``).

Starts its own master and replica (two ``redis-server`` processes on localhost, the shipped
``infra/redis.conf``: AOF, fsync every second) and appends token batches the way a worker
does (``GenerationLog`` and its ``LogWriter``: one script call per batch), timing each append
from the call to its return:

- ``off``  — the append script alone (``BROKER_APPEND_WAIT_REPLICAS=0``, the default);
- ``wait`` — the script then ``WAIT 1 <timeout>`` on the same connection, one pipeline
  (``BROKER_APPEND_WAIT_REPLICAS=1``).

Each round runs ``--streams`` generations at once (a worker's concurrent jobs), each appending
``--batches`` batches of ``--tokens`` tokens back to back; rounds alternate between the modes
(``off``, ``wait``, ``off``…) so that drift on the machine hits both alike. Appends never
fail here; a ``wait`` append whose replica did not acknowledge in time is counted as a
shortfall (there should be none: the replica is local and idle).

    python infra/bench/append_wait.py                     # 4 rounds per mode
    python infra/bench/append_wait.py --streams 50 --rounds 6

Needs redis-server on the PATH (or ``--redis-server``). Prints one table; exits 1 if a
generation did not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from broker import events  # noqa: E402
from broker.events import Event, EventType  # noqa: E402
from broker.generation_log import GenerationLog  # noqa: E402
from broker.replica_wait import ReplicaWait  # noqa: E402
from broker.state import GenerationState, Status, new_stream_id, now_ms  # noqa: E402

MODES = ("off", "wait")


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    directory: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def redis_server(binary: str) -> Iterator[Server]:
    """A redis-server with the shipped configuration, in a temporary directory."""
    port, directory = free_port(), Path(tempfile.mkdtemp(prefix="sb-bench-redis-"))
    command = [binary, str(REPO / "infra" / "redis.conf"), "--port", str(port)]
    command += ["--bind", "127.0.0.1", "--dir", str(directory)]
    command += ["--logfile", str(directory / "redis.log")]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(200):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.02)
        yield Server(port, process, directory)
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def replicate(replica: Server, master: Server) -> None:
    """``replica`` follows ``master``; returns once it has synced, rewritten its AOF from
    the sync, and the master counts it for ``WAIT`` (until then a ``WAIT`` times out)."""
    source = redis.Redis(port=master.port)
    source.config_set("repl-diskless-sync-delay", 0)
    client = redis.Redis(port=replica.port)
    client.replicaof("127.0.0.1", master.port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = _info(client, "replication")
        disk = _info(client, "persistence")
        if (
            info.get("master_link_status") == "up"
            and not info.get("master_sync_in_progress")
            and not disk.get("aof_rewrite_in_progress")
            and not disk.get("aof_rewrite_scheduled")
            and not disk.get("loading")
            # The master counts a replica for WAIT once it is online, after its first
            # acknowledgement (sent up to a second after the sync).
            and _info(source, "replication").get("slave0", {}).get("state") == "online"
        ):
            return
        time.sleep(0.05)
    raise SystemExit("the replica did not sync within 30 s")


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    info: dict[str, Any] = client.info(section)  # type: ignore[assignment]
    return info


@dataclass
class Round:
    mode: str
    #: Milliseconds of each append, from the call to its return.
    appends_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0


async def one_generation(log: GenerationLog, batches: int, tokens: int, into: Round) -> None:
    state = GenerationState(
        id=new_stream_id(),
        model="fake",
        status=Status.QUEUED,
        created_at_ms=now_ms(),
        request={"model": "fake", "messages": []},
    )
    await log.create(state)
    claim = await log.claim(state.id, worker="bench", lease_seconds=30)
    writer = log.writer(state.id, claim, lease_seconds=30)
    await writer.append(events.metadata(state, attempt=claim.attempt, t=0))
    for number in range(batches):
        batch = [
            Event(EventType.TOKEN, {"text": f" word{number}.{i}", "tokens": 1}, t=number)
            for i in range(tokens)
        ]
        if number == batches - 1:
            batch.append(events.done("stop", events.NO_USAGE, t=number))
        start = time.perf_counter()
        await writer.append(*batch)
        into.appends_ms.append((time.perf_counter() - start) * 1000)
    if (await log.get(state.id)).status is not Status.COMPLETED:
        raise SystemExit(f"generation {state.id} did not complete")


async def one_round(client: aioredis.Redis, mode: str, args: argparse.Namespace) -> Round:
    wait = ReplicaWait(1, args.timeout_ms) if mode == "wait" else ReplicaWait()
    log = GenerationLog(client, retention_seconds=600, replica_wait=wait)
    result = Round(mode)
    start = time.perf_counter()
    await asyncio.gather(
        *(one_generation(log, args.batches, args.tokens, result) for _ in range(args.streams))
    )
    result.seconds = time.perf_counter() - start
    return result


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(rounds: list[Round], shortfalls: int, args: argparse.Namespace) -> None:
    print(
        f"{args.streams} generations at once x {args.batches} batches of {args.tokens} "
        f"tokens, {args.rounds} rounds per mode, WAIT timeout {args.timeout_ms} ms"
    )
    print(f"{'ms per append':<14}{'median':>9}{'p90':>9}{'p99':>9}{'max':>9}{'appends/s':>12}")
    for mode in MODES:
        mine = [r for r in rounds if r.mode == mode]
        values = [v for r in mine for v in r.appends_ms]
        rate = len(values) / sum(r.seconds for r in mine)
        print(
            f"{mode:<14}{statistics.median(values):>9.3f}{percentile(values, 0.9):>9.3f}"
            f"{percentile(values, 0.99):>9.3f}{max(values):>9.3f}{rate:>12.0f}"
        )
    print(f"shortfalls (wait appends the replica did not acknowledge in time): {shortfalls}")


async def bench(master: Server, args: argparse.Namespace) -> None:
    from prometheus_client import REGISTRY

    def shortfalls() -> int:
        return int(REGISTRY.get_sample_value("streambroker_append_replica_shortfalls_total") or 0)

    client = aioredis.Redis(port=master.port, max_connections=args.streams + 8)
    await one_round(client, "off", args)  # warm-up: connections, scripts, allocator
    await one_round(client, "wait", args)
    warm_up = shortfalls()
    rounds = [await one_round(client, mode, args) for _ in range(args.rounds) for mode in MODES]
    report(rounds, shortfalls() - warm_up, args)
    print(f"shortfalls in the warm-up rounds: {warm_up}")
    await client.flushall()
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=20, help="generations at once")
    parser.add_argument("--batches", type=int, default=50, help="batches per generation")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per batch")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per mode")
    parser.add_argument(
        "--timeout-ms", type=int, default=ReplicaWait().timeout_ms, help="WAIT's timeout"
    )
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "")
    args = parser.parse_args()
    if not args.redis_server:
        raise SystemExit("redis-server is not on the PATH (or give --redis-server)")
    with redis_server(args.redis_server) as master, redis_server(args.redis_server) as replica:
        replicate(replica, master)
        asyncio.run(bench(master, args))


if __name__ == "__main__":
    main()
