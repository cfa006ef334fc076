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
from typing import Any

import asyncpg
import fakeredis
import httpx
import pytest
import redis.asyncio as aioredis

from broker import events, keys, metrics
from broker.archive import export_lines, import_lines
from broker.archive_schema import meta_problem
from broker.creation import _idempotency_seconds
from broker.events import Event, EventType
from broker.generation_log import GenerationLog
from broker.keys import MetaField
from broker.listing import Cursor, InvalidCursor
from broker.pg_archive.archiver import Archiver
from broker.pg_archive.store import ArchiveStore
from broker.request import GenerationRequest
from broker.settings import Settings
from broker.state import GenerationState, Status, new_stream_id, now_ms
from tests.support.generations import create, state
from tests.support.postgres import PostgresServer
from tests.support.processes import Launcher
from tests.support.redis_server import RedisServer
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


def archiving_at_once(url: str) -> dict[str, str]:
    """Processes that archive to ``url`` and let Redis forget at once."""
    return {
        "BROKER_ARCHIVE_URL": url,
        "BROKER_ARCHIVE_AFTER_SECONDS": "0",
        "BROKER_SWEEP_SECONDS": "0.2",
    }


async def let_go(redis_url: str, stream_id: str) -> None:
    """Wait until Redis no longer holds the generation (archived, then dropped)."""
    store = aioredis.from_url(redis_url)
    try:

        async def gone() -> bool:
            return not await store.exists(keys.meta_key(stream_id))

        await eventually_async(gone, timeout=DEADLINE, what=f"{stream_id} archived, let go")
    finally:
        await store.aclose()


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
    # The first failure ends the pass: the rest are not read for nothing meanwhile.
    assert done.failed == 1
    assert done.copied == done.dropped == 0
    assert metrics.ARCHIVE_FAILURES._value.get() == failures + 1
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
    env = archiving_at_once(postgres_server.url)
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

        await let_go(launch.redis_url, stream_id)
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
    env = archiving_at_once(postgres_server.url)
    launch.flush()
    api = launch.api(env).url
    launch.worker(env)
    stream_id = await create(client, api, max_tokens=10, rate=2000)
    await let_go(launch.redis_url, stream_id)
    before = (await client.get(f"{api}/v1/streams/{stream_id}/events")).content

    postgres_server.stop()
    away = await client.get(f"{api}/v1/streams/{stream_id}")
    assert away.status_code == 503
    assert away.json()["error"]["code"] == "store_unavailable"
    fresh = await create(client, api, max_tokens=10, rate=2000)  # the live path goes on

    async def completed() -> bool:
        return (await state(client, api, fresh))["status"] == "completed"

    await eventually_async(completed, timeout=DEADLINE, what="a generation while it is away")

    fresh_hot = (await client.get(f"{api}/v1/streams/{fresh}/events")).content
    fresh_last = (await state(client, api, fresh))["last_event_id"]

    postgres_server.start()

    async def back() -> bool:
        answer = await client.get(f"{api}/v1/streams/{stream_id}/events")
        return answer.status_code == 200 and answer.content == before

    await eventually_async(back, timeout=DEADLINE, what="archived reads answering again")
    # The generation that finished while it was away is archived once it is back.
    await let_go(launch.redis_url, fresh)
    assert await archived_events(postgres_server.url, fresh) == list(range(1, fresh_last + 1))
    assert (await client.get(f"{api}/v1/streams/{fresh}/events")).content == fresh_hot


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


# -- each a defect an adversarial review found ------------------------------------------------


async def test_a_long_generation_is_copied_whole_in_pages(
    log: GenerationLog, archive: ArchiveStore, postgres_server: PostgresServer
) -> None:
    """The copy reads the log in pages (one script over a long log would block Redis): all
    of it, in order."""
    log.archive = archive
    stream_id = await finished_generation(log, tokens=2500)
    await Archiver(log, archive, after_seconds=600).archive_once()
    assert await archived_events(postgres_server.url, stream_id) == list(range(1, 2503))


async def test_a_generation_the_archive_let_go_before_its_drop_is_copied_again_whole(
    log: GenerationLog, archive: ArchiveStore, postgres_server: PostgresServer
) -> None:
    """The archive's retention deleted the row while Redis still held the keys (a drop
    delayed past it): the drop used to put the row back without its events, and delete the
    keys, leaving a state without events (readers reconnecting for good)."""
    log.archive = archive
    stream_id = await finished_generation(log)
    hot = await log.read(stream_id, 0)
    archiver = Archiver(log, archive, after_seconds=0)
    assert (await archiver.archive_once()).copied == 1
    connection = await asyncpg.connect(postgres_server.url)
    try:
        await connection.execute("DELETE FROM streambroker_generations")
    finally:
        await connection.close()

    assert (await archiver.archive_once(now=now_ms() + 60_000)).dropped == 1
    assert not await log.redis.exists(keys.meta_key(stream_id))
    assert await log.read(stream_id, 0) == hot
    assert await archived_events(postgres_server.url, stream_id) == [e.seq for e in hot]


async def test_a_generation_the_archive_cannot_hold_stays_in_redis_and_is_not_retried(
    log: GenerationLog, archive: ArchiveStore
) -> None:
    """A NUL in a text column (a tenant, from an import of an older version): retrying
    every 5 s for good helped nothing and kept the failure count and the lag climbing."""
    log.archive = archive
    request = GenerationRequest(model="fake", messages=[{"role": "user", "content": "hi"}])
    poisoned = GenerationState(
        id=new_stream_id(),
        model="fake",
        status=Status.QUEUED,
        created_at_ms=now_ms(),
        request=request.to_dict(),
        tenant="a\x00b",
    )
    await log.create(poisoned)
    claim = await log.claim(poisoned.id, worker="w-1", lease_seconds=5)
    writer = log.writer(poisoned.id, claim, lease_seconds=5)
    await writer.append(events.done("stop", events.NO_USAGE, t=1))
    archiver = Archiver(log, archive, after_seconds=0)

    assert (await archiver.archive_once()).failed == 1
    assert await log.redis.zscore(keys.ARCHIVE_DUE_KEY, poisoned.id) is None
    assert await log.redis.zscore(keys.ARCHIVE_PENDING_KEY, poisoned.id) is None
    assert await log.redis.exists(keys.meta_key(poisoned.id))
    assert (await archiver.archive_once(now=now_ms() + 600_000)).failed == 0


async def test_an_import_is_due_for_the_archive_before_its_commit(
    log: GenerationLog, archive: ArchiveStore, postgres_server: PostgresServer
) -> None:
    """The import put itself in the due set after its commit, and a crash (or a Redis blip)
    between left it out for good: there is no lease for a sweeper to find."""
    source = await finished_generation(log)
    lines = [line async for line in export_lines(log, source)]
    await log.redis.flushall()
    log.archive = archive

    async def feed() -> AsyncIterator[str]:
        for line in lines:
            yield line

    imported = await import_lines(log, feed())
    due = await log.redis.zscore(keys.ARCHIVE_DUE_KEY, imported)
    assert due is not None
    archiver = Archiver(log, archive, after_seconds=600)
    assert (await archiver.archive_once()).copied == 0  # not yet: it may still be committing
    assert (await archiver.archive_once(now=int(due))).copied == 1
    assert len(await archived_events(postgres_server.url, imported)) == len(lines) - 1


def test_an_import_whose_tenant_postgres_cannot_hold_is_refused() -> None:
    assert meta_problem(MetaField.TENANT, "a\x00b") is not None
    assert meta_problem(MetaField.TENANT, "acme-eu") is None


def test_the_idempotency_key_never_outlives_the_archived_generation() -> None:
    """A retried create after the archive's retention deleted its generation made it again."""
    log = GenerationLog(fakeredis.aioredis.FakeRedis(), retention_seconds=7 * 86_400)
    assert _idempotency_seconds(log) == keys.IDEMPOTENCY_SECONDS
    log.archive = ArchiveStore(pool=None, retention_seconds=3600)
    assert _idempotency_seconds(log) == 3600


def test_a_cursor_with_a_foreign_id_is_refused_as_a_cursor() -> None:
    """A NUL in a cursor's id reached PostgreSQL, whose refusal answered a retryable 503."""
    with pytest.raises(InvalidCursor):
        Cursor.decode("1796286532850.\x00abc")


async def test_a_starting_worker_knows_its_archive_before_its_sweeper_runs(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeper started before the worker connected to its archive: a generation its
    first sweeps ended (after a crash of everything, workers back first) left the lease
    index without entering the due set, and was never archived (seen 3 times in 3)."""
    from workers import worker

    seen: list[bool] = []

    async def connect(settings: object) -> ArchiveStore:
        seen.append("sweeper" in ctx)
        return ArchiveStore(pool=None)

    monkeypatch.setattr(worker, "connect_archive", connect)
    settings = Settings.from_env(
        {"REDIS_URL": redis_server.url, "BROKER_ARCHIVE_URL": "postgresql://db/x"}
    )
    ctx: dict[str, Any] = {"redis": aioredis.from_url(redis_server.url)}
    try:
        await worker.worker_options(settings)["on_startup"](ctx)
        assert seen == [False]
        assert ctx["runtime"].log.archive is not None
    finally:
        for name in ("sweeper", "archiver"):
            ctx[name].cancel()
        await ctx["redis"].aclose()
