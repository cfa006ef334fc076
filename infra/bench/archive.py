"""What the PostgreSQL archive saves and costs: Redis memory per finished generation before and
after archiving, and the latency of resumes and replays served from Redis against those
served from the archive.

    python infra/bench/archive.py                       # 1000 generations of ~5 KB, 300 reads
    python infra/bench/archive.py --generations 5000 --tokens 400 --reads 1000

Fresh processes on free ports of 127.0.0.1: a private ``redis-server`` and one api
(``python -m broker api``) with ``BROKER_ARCHIVE_URL`` naming a scratch database it creates
on ``--postgres`` (dropped at the end). The generations are written into Redis as a worker
writes them (``GenerationLog``: metadata, token batches of ``--batch`` tokens, done), then
archived in-process with the broker's own ``Archiver`` (copy, then drop).

Memory: ``used_memory_dataset`` of ``INFO memory`` (after a ``MEMORY PURGE``) with no
generation, with all of them finished in Redis, and once archived and let go; per
generation. Latency, over
``--reads`` requests on one keep-alive client, each to a random generation: a resume (``GET
…/events`` with ``Last-Event-ID`` half-way: the second half of the answer) and a replay (the
whole recording, ``?replay=1000``: paced by its own timestamps, sped up 1000 times), to the
last byte; median and p99, from Redis, then from the archive.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx
import redis
import redis.asyncio as aioredis
from fanout_procs import Processes, start_api, start_redis
from fanout_report import git_commit, machine_info

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from broker import events, keys  # noqa: E402
from broker.events import Event, EventType  # noqa: E402
from broker.generation_log import GenerationLog  # noqa: E402
from broker.pg_archive.archiver import Archiver  # noqa: E402
from broker.pg_archive.store import ArchiveStore  # noqa: E402
from broker.request import GenerationRequest  # noqa: E402
from broker.state import GenerationState, Status, new_stream_id, now_ms  # noqa: E402

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "streams",
    "of",
    "tokens",
    "flow",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=1000, help="tokens per generation")
    parser.add_argument("--batch", type=int, default=16, help="tokens per appended event")
    parser.add_argument("--reads", type=int, default=300, help="requests per kind and tier")
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL where a scratch database may be created",
    )
    args = parser.parse_args()
    database = f"sb_bench_{secrets.token_hex(6)}"
    admin = args.postgres
    archive_url = admin.rsplit("/", 1)[0] + f"/{database}"
    asyncio.run(_admin(admin, f"CREATE DATABASE {database}"))
    try:
        with tempfile.TemporaryDirectory(prefix="sb-archive-") as workdir:
            run(args, Path(workdir), archive_url)
    finally:
        asyncio.run(_admin(admin, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))


async def _admin(url: str, statement: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def run(args: argparse.Namespace, workdir: Path, archive_url: str) -> None:
    procs = Processes(workdir, dict(os.environ), REPO)
    try:
        (datadir := workdir / "redis").mkdir()
        redis_url, _ = start_redis(procs, datadir, maxclients=1000)
        procs.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "BROKER_ARCHIVE_URL": archive_url,
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
        }
        store = redis.Redis.from_url(redis_url)
        url, _ = start_api(procs, "api")
        empty = used_memory(store)
        ids = asyncio.run(write(args, redis_url, archive_url))
        forget_jobs(store)
        finished = used_memory(store)
        hot = measure(args, url, ids)
        copy_seconds = asyncio.run(archive(redis_url, archive_url))
        archived = used_memory(store)
        print(f"keys left in Redis: {store.dbsize()}")
        cold = measure(args, url, ids)
        report(args, store, empty, finished, archived, copy_seconds, hot, cold)
    finally:
        procs.stop_all()


def forget_jobs(store: redis.Redis) -> None:
    """The queue entries and job records the creates left: a worker that ran the jobs would
    have removed them (none ran here: the generations were written by this script)."""
    store.delete(keys.QUEUE_NAME)
    for key in store.scan_iter(match="arq:*", count=1000):
        store.delete(key)


def used_memory(store: redis.Redis) -> int:
    """What the data takes: ``used_memory_dataset`` (``used_memory`` less Redis's own
    overhead: client buffers, the script cache, replication), after a purge."""
    store.execute_command("MEMORY", "PURGE")
    return int(store.info("memory")["used_memory_dataset"])


async def write(args: argparse.Namespace, redis_url: str, archive_url: str) -> list[str]:
    """The generations, finished in Redis as a worker leaves them."""
    client = aioredis.from_url(redis_url)
    log = GenerationLog(client, retention_seconds=86_400)
    log.archive = await ArchiveStore.connect(archive_url)  # finished ones become due
    rng = random.Random(1)
    ids = []
    request = GenerationRequest(model="fake", messages=[{"role": "user", "content": "bench"}])
    for _ in range(args.generations):
        state = GenerationState(
            id=new_stream_id(),
            model="fake",
            status=Status.QUEUED,
            created_at_ms=now_ms(),
            request=request.to_dict(),
        )
        await log.create(state)
        claim = await log.claim(state.id, worker="bench", lease_seconds=30)
        writer = log.writer(state.id, claim, lease_seconds=30)
        batch = [events.metadata(await log.get(state.id), attempt=claim.attempt, t=1)]
        for n in range(0, args.tokens, args.batch):
            count = min(args.batch, args.tokens - n)
            text = "".join(" " + rng.choice(WORDS) for _ in range(count))
            batch.append(Event(EventType.TOKEN, {"text": text, "tokens": count}, t=2 + n))
        usage = {"prompt_tokens": 3, "completion_tokens": args.tokens}
        usage["total_tokens"] = 3 + args.tokens
        batch.append(events.done("stop", usage, t=2 + args.tokens))
        await writer.append(*batch)
        ids.append(state.id)
    await log.archive.close()
    await client.aclose()
    return ids


async def archive(redis_url: str, archive_url: str) -> float:
    """Copy every due generation and let Redis forget it, as the workers' archiver does."""
    client = aioredis.from_url(redis_url)
    log = GenerationLog(client, retention_seconds=86_400)
    store = await ArchiveStore.connect(archive_url)
    log.archive = store
    archiver = Archiver(log, store, after_seconds=0)
    started = time.monotonic()
    copied = 0
    while True:
        done = await archiver.archive_once()
        copied += done.copied
        if done.copied == done.dropped == 0:
            break
    seconds = time.monotonic() - started
    await store.close()
    await client.aclose()
    print(f"archived {copied} generations in {seconds:.1f} s")
    return seconds


def measure(args: argparse.Namespace, url: str, ids: list[str]) -> dict[str, list[float]]:
    rng = random.Random(2)
    taken: dict[str, list[float]] = {"resume": [], "replay": []}
    half = str(args.tokens // args.batch // 2)
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(args.reads):
            stream_id = rng.choice(ids)
            for kind, path, headers in (
                ("resume", f"/v1/streams/{stream_id}/events", {"Last-Event-ID": half}),
                ("replay", f"/v1/streams/{stream_id}/events?replay=1000", {}),
            ):
                started = time.perf_counter()
                answer = http.get(path, headers=headers)
                taken[kind].append((time.perf_counter() - started) * 1000)
                if answer.status_code != 200 or b"event: done" not in answer.content:
                    raise SystemExit(f"{kind} of {stream_id}: {answer.status_code}")
    return taken


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def report(
    args: argparse.Namespace,
    store: redis.Redis,
    empty: int,
    finished: int,
    archived: int,
    copy_seconds: float,
    hot: dict[str, list[float]],
    cold: dict[str, list[float]],
) -> None:
    n = args.generations
    print(f"\ncommit {git_commit(REPO)}")
    print(f"machine {machine_info(store.info()['redis_version'])}")
    print(f"{n} generations of {args.tokens} tokens in events of {args.batch}")
    print("\nRedis used_memory_dataset   total        per generation")
    for label, used in (("finished, in Redis", finished), ("archived, let go", archived)):
        grown = used - empty
        print(f"{label:22}{grown / 1e6:10.2f} MB  {grown / n:10.0f} B")
    print(f"copy and drop: {copy_seconds / n * 1000:.2f} ms per generation (one archiver)")
    print("\nms to the last byte        median      p99")
    for kind in ("resume", "replay"):
        for tier, runs in (("Redis", hot[kind]), ("archive", cold[kind])):
            label = f"{kind} from {tier}"
            print(f"{label:22} {statistics.median(runs):9.2f} {p99(runs):8.2f}")


if __name__ == "__main__":
    main()
