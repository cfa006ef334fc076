"""A Redis master and its replica as real redis-server processes, and a failover between them.

Replication is asynchronous: the master acknowledges a write before any replica has it. A
failover that promotes a replica lagging behind therefore loses what the master acknowledged
last, on a new timeline (a new replication id). ``promote`` is that failover, done at the
moment a test chooses: everything written to the master before it and confirmed with
``wait_for_replica`` is on the replica; anything written to the master after it is lost to
the replica's timeline, exactly as if the replica had lagged.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from starlette.testclient import TestClient

from api.app import create_app
from broker import events
from broker.events import Event, EventType
from broker.generation_log import GenerationLog, LogWriter
from broker.settings import Settings
from broker.state import GenerationState, Status, new_stream_id, now_ms
from broker.sweeper import LeaseSweeper
from tests.support.redis_server import RedisServer, running_server
from tests.support.sse import decode_sse
from tests.support.waiting import eventually


@contextmanager
def master_and_replica() -> Iterator[tuple[RedisServer, RedisServer]]:
    """Two private redis-servers, the second a read-only replica of the first, in sync."""
    with running_server() as master, running_server() as replica:
        follow(replica, master)
        yield master, replica


def follow(replica: RedisServer, master: RedisServer) -> None:
    """Make ``replica`` replicate ``master`` and wait until it has synced."""
    with redis.Redis(port=master.port) as source, redis.Redis(port=replica.port) as client:
        # The full sync otherwise waits 5 s for more replicas to share its transfer.
        source.config_set("repl-diskless-sync-delay", 0)
        client.config_set("replica-read-only", "yes")
        client.replicaof("127.0.0.1", master.port)

        def synced() -> bool:
            info = client.info("replication")
            # The master counts the replica (for WAIT) once it is online: after its first
            # acknowledgement, up to a second after the sync.
            replica_seen = source.info("replication").get("slave0", {})
            return bool(
                info.get("master_link_status") == "up"
                and not info.get("master_sync_in_progress")
                and replica_seen.get("state") == "online"
            )

        eventually(synced, timeout=10, what=f"redis on {replica.port} to sync with {master.port}")


async def wait_for_replica(master: aioredis.Redis, timeout_ms: int = 5000) -> None:
    """Until the replica acknowledged everything written to ``master`` so far (by any
    client: ``WAIT`` counts this connection's writes, so a write of its own comes last)."""
    await master.set("sb:test:replicated", "1")
    acknowledged = await master.wait(1, timeout_ms)
    assert acknowledged >= 1, "the replica did not acknowledge the writes"


def promote(replica: RedisServer) -> None:
    """The failover: the replica stops following and becomes a master (new replication id)."""
    with redis.Redis(port=replica.port) as client:
        client.replicaof("NO", "ONE")


def replication_id(server: RedisServer) -> str:
    """The server's ``master_replid``: the store epoch the broker records."""
    with redis.Redis(port=server.port) as client:
        replid: str = client.info("replication")["master_replid"]
        return replid


# ------------------------------------------------------- a failover at a chosen moment

LEASE = 5.0
LATER = 60_000  # ms past now: every lease taken in a test has lapsed by then


def token(text: str) -> Event:
    return Event(EventType.TOKEN, {"text": text, "tokens": 1}, t=1)


def done() -> Event:
    return Event(EventType.DONE, {"finish_reason": "stop", "usage": {}}, t=2)


def queued() -> GenerationState:
    return GenerationState(
        id=new_stream_id(),
        model="fake",
        status=Status.QUEUED,
        created_at_ms=now_ms(),
        request={"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
    )


@dataclass
class Failover:
    """A master (``a``) and its replica (``b``), each with a client and a log on it."""

    a: RedisServer
    b: RedisServer
    log_a: GenerationLog
    log_b: GenerationLog

    def sweeper_on_b(self) -> LeaseSweeper:
        return LeaseSweeper(self.log_b, owner="sweeper-b", lease_seconds=LEASE)


@contextlib.asynccontextmanager
async def failover_pair() -> AsyncIterator[Failover]:
    """A master and its replica, with a client and a log on each (the ``pair`` fixture)."""
    with master_and_replica() as (a, b):
        redis_a, redis_b = aioredis.Redis(port=a.port), aioredis.Redis(port=b.port)
        try:
            yield Failover(
                a,
                b,
                GenerationLog(redis_a, retention_seconds=600),
                GenerationLog(redis_b, retention_seconds=600),
            )
        finally:
            await redis_a.aclose()
            await redis_b.aclose()


async def running(log: GenerationLog, *texts: str) -> tuple[str, LogWriter]:
    """A generation claimed by a writer that appended metadata and ``texts`` (ids 1, 2…)."""
    state = queued()
    await log.create(state)
    claim = await log.claim(state.id, worker="w1", lease_seconds=LEASE)
    writer = log.writer(state.id, claim, lease_seconds=LEASE)
    await writer.append(events.metadata(state, attempt=claim.attempt, t=0))
    await writer.append(*(token(t) for t in texts))
    return state.id, writer


async def failed_over(pair: Failover, kept: str, lost: str) -> tuple[str, LogWriter]:
    """A generation whose writer appended ``kept`` (one token each) before a failover and
    ``lost`` after it: the promoted replica has only the first; readers of the old master
    received both. The writer then dies (it appends nothing more)."""
    stream_id, writer = await running(pair.log_a, *kept)
    await wait_for_replica(pair.log_a.redis)
    promote(pair.b)
    await writer.append(*(token(t) for t in lost))
    return stream_id, writer


def resumes_on(server: RedisServer, stream_id: str, *points: str) -> dict[str, tuple[int, str]]:
    """The real app on ``server``: each resume point's status, and its error code or the
    frames it sent (``<id>:<event>`` …). Sync: run it in a thread."""
    settings = Settings.from_env({"REDIS_URL": server.url, "BROKER_SWEEP_SECONDS": "600"})
    answers = {}
    with TestClient(create_app(settings)) as http:
        for point in points:
            response = http.get(f"/v1/streams/{stream_id}/events", headers={"Last-Event-ID": point})
            if response.status_code == 410:
                answers[point] = (410, response.json()["error"]["code"])
            else:
                frames = decode_sse(response.text)
                answers[point] = (
                    response.status_code,
                    " ".join(f"{f.id}:{f.event}" for f in frames),
                )
    return answers
