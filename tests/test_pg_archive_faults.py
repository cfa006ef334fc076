"""Archiving through trouble, against a real redis-server and a private PostgreSQL cluster
that the tests stop, kill and start: PostgreSQL away mid-run (nothing deleted from Redis,
readers unaffected, the archive catches up when it is back), a worker killed in the middle of
a copy (its transaction rolls back; another copies it whole), two archivers copying one
generation (stored once), and the archive's own retention. Bad configuration stops a
process with one line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from broker import events, keys, metrics
from broker.events import Event, EventType
from broker.generation_log import GenerationLog
from broker.pg_archive.archiver import Archiver
from broker.pg_archive.store import ArchiveStore
from broker.request import GenerationRequest
from broker.state import GenerationState, Status, new_stream_id, now_ms
from tests.support.generations import create, state
from tests.support.postgres import PostgresServer
from tests.support.processes import Launcher
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

DEADLINE = 60.0


@pytest.fixture
async def log(redis: aioredis.Redis) -> GenerationLog:
    return GenerationLog(redis, retention_seconds=600)


@pytest.fixture
async def archive(postgres_server: PostgresServer) -> AsyncIterator[ArchiveStore]:
    store = await ArchiveStore.connect(postgres_server.url)
    yield store
    await store.close()


async def finished_generation(log: GenerationLog, tokens: int = 5) -> str:
    """A completed generation written as a worker writes one, in Redis."""
    request = GenerationRequest(model="fake", messages=[{"role": "user", "content": "hi"}])
    created = GenerationState(
        id=new_stream_id(),
        model="fake",
        status=Status.QUEUED,
        created_at_ms=now_ms(),
        request=request.to_dict(),
    )
    await log.create(created)
    claim = await log.claim(created.id, worker="w-1", lease_seconds=5)
    writer = log.writer(created.id, claim, lease_seconds=5)
    await writer.append(events.metadata(await log.get(created.id), attempt=claim.attempt, t=1))
    for i in range(tokens):
        await writer.append(Event(EventType.TOKEN, {"text": f" w{i}", "tokens": 1}, t=2 + i))
    usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
    await writer.append(events.done("stop", usage, t=10))
    return created.id


async def archived_events(url: str, stream_id: str) -> list[int]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT seq FROM streambroker_events WHERE stream_id = $1 ORDER BY seq", stream_id
        )
    finally:
        await connection.close()
    return [row["seq"] for row in rows]


async def test_postgres_away_deletes_nothing_and_the_archive_catches_up(
    log: GenerationLog, archive: ArchiveStore, postgres_server: PostgresServer
) -> None:
    log.archive = archive
    archiver = Archiver(log, archive, after_seconds=0)
    first = await finished_generation(log)
    assert (await archiver.archive_once()).copied == 1
    failures = metrics.ARCHIVE_FAILURES._value.get()

    postgres_server.stop()
    second = await finished_generation(log)
    hot = await log.read(second, 0)
    done = await archiver.archive_once(now=now_ms() + 60_000)
    assert done.failed == 2
    assert done.copied == done.dropped == 0
    assert metrics.ARCHIVE_FAILURES._value.get() == failures + 2
    # Nothing left Redis: the first (copied, not yet dropped) and the second read as before.
    assert await log.read(second, 0) == hot
    assert await log.redis.exists(keys.meta_key(first), keys.meta_key(second)) == 2

    postgres_server.start()
    later = now_ms() + 120_000
    await archiver.archive_once(now=later)
    await archiver.archive_once(now=later + 1)
    assert not await log.redis.exists(keys.meta_key(first), keys.meta_key(second))
    assert await log.read(second, 0) == hot
    assert await archived_events(postgres_server.url, second) == [e.seq for e in hot]


async def test_a_copy_repeated_or_made_twice_at_once_is_stored_once(
    log: GenerationLog, archive: ArchiveStore, postgres_server: PostgresServer
) -> None:
    log.archive = archive
    stream_id = await finished_generation(log, tokens=40)
    snapshot = await log.snapshot(stream_id)
    assert snapshot is not None
    await asyncio.gather(*(archive.store(snapshot) for _ in range(4)))
    await archive.store(snapshot)
    assert await archived_events(postgres_server.url, stream_id) == list(range(1, 43))
    # Two archivers whose claims overlap (one's lapsed): both copy, one row, each event once.
    first, second = (Archiver(log, archive, after_seconds=600) for _ in range(2))
    await asyncio.gather(first.archive_once(), second.archive_once(now=now_ms() + 600_000))
    assert await archived_events(postgres_server.url, stream_id) == list(range(1, 43))
    assert await archive.count() == 1


async def test_the_archive_keeps_generations_for_its_retention(
    log: GenerationLog, archive: ArchiveStore, postgres_server: PostgresServer
) -> None:
    log.archive = archive
    stream_id = await finished_generation(log)
    await Archiver(log, archive, after_seconds=0).archive_once()
    connection = await asyncpg.connect(postgres_server.url)
    try:
        await connection.execute(
            "UPDATE streambroker_generations SET archived_at = now() - interval '2 hours'"
        )
    finally:
        await connection.close()
    keeping = Archiver(log, archive, after_seconds=0, retention_seconds=3 * 3600)
    await keeping.archive_once()
    assert await archive.holds(stream_id)
    await Archiver(log, archive, after_seconds=0, retention_seconds=3600).archive_once()
    assert not await archive.holds(stream_id)
    assert await archived_events(postgres_server.url, stream_id) == []


async def test_a_worker_killed_mid_copy_leaves_redis_whole_and_another_copies_it(
    launch: Launcher, client: httpx.AsyncClient, postgres_server: PostgresServer
) -> None:
    env = {
        "BROKER_ARCHIVE_URL": postgres_server.url,
        "BROKER_ARCHIVE_AFTER_SECONDS": "0",
        "BROKER_SWEEP_SECONDS": "0.2",
    }
    launch.flush()
    api = launch.api(env).url
    # The copy blocks inside its transaction: a session holds the events table locked.
    blocker = await asyncpg.connect(postgres_server.url)
    watcher = await asyncpg.connect(postgres_server.url)
    store = aioredis.from_url(launch.redis_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE streambroker_events IN ACCESS EXCLUSIVE MODE")
        worker = launch.worker(env)
        stream_id = await create(client, api, max_tokens=60, rate=2000)

        async def copy_waits() -> bool:
            # Asked outside the locking transaction, whose view of the activity is frozen.
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%streambroker_events%'"
            )
            return bool(waiting)

        await eventually_async(copy_waits, timeout=DEADLINE, what="the copy waiting on the lock")
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(10)
        await transaction.rollback()
        # The killed copy's transaction rolled back with its connection: no row at all.
        await eventually_async(
            lambda: _no_row(watcher, stream_id), timeout=DEADLINE, what="the rollback"
        )
        assert await store.hget(keys.meta_key(stream_id), "archived_at_ms") is None
        hot = (await client.get(f"{api}/v1/streams/{stream_id}/events")).content
        last = (await state(client, api, stream_id))["last_event_id"]

        launch.worker(env)
        # Its claim would lapse in a minute: move it on.
        await store.zadd(keys.ARCHIVE_DUE_KEY, {stream_id: 0}, xx=True)

        async def let_go() -> bool:
            return not await store.exists(keys.meta_key(stream_id))

        await eventually_async(let_go, timeout=DEADLINE, what="archived and let go")
        assert await archived_events(postgres_server.url, stream_id) == list(range(1, last + 1))
        assert (await client.get(f"{api}/v1/streams/{stream_id}/events")).content == hot
    finally:
        await blocker.close()
        await watcher.close()
        await store.aclose()


async def _no_row(connection: asyncpg.Connection, stream_id: str) -> bool:
    count = await connection.fetchval(
        "SELECT count(*) FROM streambroker_generations WHERE id = $1", stream_id
    )
    return count == 0


async def test_readers_of_archived_generations_get_a_retryable_error_while_postgres_is_away(
    launch: Launcher, client: httpx.AsyncClient, postgres_server: PostgresServer
) -> None:
    env = {
        "BROKER_ARCHIVE_URL": postgres_server.url,
        "BROKER_ARCHIVE_AFTER_SECONDS": "0",
        "BROKER_SWEEP_SECONDS": "0.2",
    }
    launch.flush()
    api = launch.api(env).url
    launch.worker(env)
    stream_id = await create(client, api, max_tokens=10, rate=2000)
    store = aioredis.from_url(launch.redis_url)
    try:

        async def let_go() -> bool:
            return not await store.exists(keys.meta_key(stream_id))

        await eventually_async(let_go, timeout=DEADLINE, what="archived and let go")
    finally:
        await store.aclose()
    before = (await client.get(f"{api}/v1/streams/{stream_id}/events")).content

    postgres_server.stop()
    away = await client.get(f"{api}/v1/streams/{stream_id}")
    assert away.status_code == 503
    assert away.json()["error"]["code"] == "store_unavailable"
    fresh = await create(client, api, max_tokens=10, rate=2000)  # the live path goes on

    async def completed() -> bool:
        return (await state(client, api, fresh))["status"] == "completed"

    await eventually_async(completed, timeout=DEADLINE, what="a generation while it is away")

    postgres_server.start()

    async def back() -> bool:
        answer = await client.get(f"{api}/v1/streams/{stream_id}/events")
        return answer.status_code == 200 and answer.content == before

    await eventually_async(back, timeout=DEADLINE, what="archived reads answering again")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://db/x", "BROKER_ARCHIVE_URL is malformed"),
        ("postgresql://127.0.0.1:1/none", "BROKER_ARCHIVE_URL: cannot connect"),
    ],
)
def test_a_bad_or_unreachable_archive_stops_every_process_in_one_line(
    redis_server: object, url: str, says: str
) -> None:
    for command in ("api", "worker", "dev"):
        done = subprocess.run(
            [sys.executable, "-m", "broker", command, "--port", "0"],
            env={**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0", "BROKER_ARCHIVE_URL": url},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert says in lines[0], done.stderr
