"""Export and import (``broker.archive``) on a real Redis Cluster (three masters;
``tests.support.cluster``), through a ``GenerationLog`` on the broker's cluster client.

There an import's record lives in the generation's slot and its listing entries in the control
slot, on another node: no transaction spans them. So the entries go first and the record in
one script, and what these tests check is that the outcome is still all or nothing for
readers and listings alike:

- a finished stream exported and imported (under a new id, and under its own once deleted)
  reads back the same events and text, is listed, and cannot be imported twice;
- an import that loses the race for its id to another leaves the winner's stream and entry;
- an import whose staged keys expired before the end leaves no stream and no entry;
- a listing that reads the index while the record is on its way (and drops the entry, as
  the stream's score is its creation time, long past) does not leave it unlisted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from broker import archive, events, keys
from broker.archive import ImportInterrupted, export_lines, import_lines, split_lines
from broker.archive_format import AlreadyExists
from broker.events import Event, EventType
from broker.generation_log import GenerationLog
from broker.listing import list_streams
from broker.state import now_ms
from tests.support import archives
from tests.support.cluster import RedisClusterSet, broker_client
from tests.support.generation_job import new_state

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

TEXTS = ["Hello", ", ", "wörld\u2028", "!"]


@pytest.fixture
async def store(redis_cluster: RedisClusterSet) -> AsyncIterator[RedisCluster]:
    """The broker's client of the shared cluster (``tests/conftest.py``: whole and empty)."""
    async with broker_client(redis_cluster) as client:
        yield client


@pytest.fixture
def log(store: RedisCluster) -> GenerationLog:
    log = GenerationLog(store, retention_seconds=600)
    assert log.on_cluster
    return log


async def finished(log: GenerationLog, cluster: RedisClusterSet) -> str:
    """A generation written as a worker writes it, on another node than the control slot's
    (so that its import's two steps are on two nodes); its id."""
    control = cluster.owner_of(keys.INDEX_KEY)
    state = new_state()
    while cluster.owner_of(keys.meta_key(state.id)) == control:
        state = new_state()
    await log.create(state)
    claim = await log.claim(state.id, worker="w-test", lease_seconds=5)
    writer = log.writer(state.id, claim, lease_seconds=5)
    await writer.append(events.metadata(await log.get(state.id), attempt=claim.attempt, t=1))
    await writer.append(
        *(
            Event(EventType.TOKEN, {"text": text, "tokens": 1}, t=10 + i)
            for i, text in enumerate(TEXTS)
        )
    )
    usage = {"prompt_tokens": 3, "completion_tokens": len(TEXTS), "total_tokens": len(TEXTS) + 3}
    await writer.append(events.done("stop", usage, t=20))
    return state.id


async def exported(log: GenerationLog, stream_id: str) -> str:
    return "".join([line async for line in export_lines(log, stream_id)])


def rows_of(text: str) -> list[dict[str, Any]]:
    """An archive's lines as values (a hash's fields come back in any order); only ``\\n``
    ends a line: its texts hold U+2028 raw."""
    return [json.loads(line) for line in text.split("\n") if line]


async def imported(log: GenerationLog, text: str, *, tenant: str | None = None) -> str:
    """``text`` imported as the api imports a request's body."""

    async def body() -> AsyncIterator[bytes]:
        yield text.encode()

    return await import_lines(log, split_lines(body()), tenant=tenant)


async def listed(log: GenerationLog, tenant: str | None) -> set[str]:
    page, _ = await list_streams(log, tenant=tenant, limit=1000)
    return {state.id for state in page}


async def indexed(store: RedisCluster, stream_id: str, tenant: str) -> list[float | None]:
    return [await store.zscore(index, stream_id) for index in keys.index_keys(tenant)]


async def stored_keys(store: RedisCluster, stream_id: str) -> list[bytes]:
    """The generation's keys, staging keys included (they share its hash tag); not the
    mark a commit leaves for a minute (``keys.import_keys``: it holds no data)."""
    return [
        key
        async for key in store.scan_iter(match=f"sb:{{{stream_id}}}:*")
        if not key.endswith(b":done")
    ]


async def test_an_exported_stream_imports_under_a_new_id_and_under_its_own(
    redis_cluster: RedisClusterSet, store: RedisCluster, log: GenerationLog
) -> None:
    source = await finished(log, redis_cluster)
    original = await log.read(source, 0)
    text = await exported(log, source)

    copy = await imported(log, text, tenant="tenant-a")
    assert copy != source
    state = await log.get(copy)
    assert (state.tenant, state.imported_from, state.text) == ("tenant-a", source, "".join(TEXTS))
    copied = await log.read(copy, 0)
    assert copied[0].data == {**original[0].data, "id": copy}
    assert copied[1:] == original[1:]
    assert copy in await listed(log, "tenant-a")
    assert None not in await indexed(store, copy, "tenant-a")

    await store.delete(*keys.generation_keys(source))
    assert await imported(log, text) == source
    assert await log.read(source, 0) == original
    assert (await log.get(source)).text == "".join(TEXTS)
    assert rows_of(await exported(log, source)) == rows_of(text)  # down to its record
    assert source in await listed(log, None)
    assert await store.ttl(keys.log_key(source)) > keys.IMPORT_STAGING_SECONDS

    with pytest.raises(AlreadyExists, match=f"a stream with id {source} exists here already"):
        await imported(log, text)
    assert await log.read(source, 0) == original
    assert sorted(await stored_keys(store, source)) == sorted(
        key.encode() for key in keys.generation_keys(source)
    )


async def test_an_import_that_loses_its_id_to_another_leaves_the_winners_stream_listed(
    redis_cluster: RedisClusterSet,
    store: RedisCluster,
    log: GenerationLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both passed the check that the id is free; the other put its record in place while
    this one's index entry was written (the script's refusal, not the early check)."""
    source = await finished(log, redis_cluster)
    original = await log.read(source, 0)
    text = await exported(log, source)
    await store.delete(*keys.generation_keys(source))
    place = archive._Staging._place

    async def overtaken(staging: archive._Staging, meta: dict[str, str]) -> None:
        monkeypatch.setattr(archive._Staging, "_place", place)
        assert await imported(log, text) == source
        await place(staging, meta)

    monkeypatch.setattr(archive._Staging, "_place", overtaken)
    with pytest.raises(AlreadyExists, match=f"a stream with id {source} exists here already"):
        await imported(log, text)
    assert await log.read(source, 0) == original
    assert None not in await indexed(store, source, "")
    assert source in await listed(log, None)
    assert sorted(await stored_keys(store, source)) == sorted(
        key.encode() for key in keys.generation_keys(source)
    )


@pytest.mark.parametrize("tenant", [None, "tenant-b"])
async def test_an_import_whose_staged_keys_expired_leaves_no_stream_and_no_entry(
    redis_cluster: RedisClusterSet,
    store: RedisCluster,
    log: GenerationLog,
    monkeypatch: pytest.MonkeyPatch,
    tenant: str | None,
) -> None:
    source = await finished(log, redis_cluster)
    text = await exported(log, source)
    await store.delete(*keys.generation_keys(source))
    await store.zrem(keys.INDEX_KEY, source)
    place = archive._Staging._place
    attempted: list[str] = []

    async def expired_first(staging: archive._Staging, meta: dict[str, str]) -> None:
        attempted.append(staging.stream_id)
        # The entries are written before the record: the refusal must take them back.
        assert None not in await indexed(store, staging.stream_id, tenant or "")
        # As if the upload had been slower than the staging keys' lifetime.
        await store.delete(staging.log_key, staging.text_key)
        await place(staging, meta)

    monkeypatch.setattr(archive._Staging, "_place", expired_first)
    with pytest.raises(ImportInterrupted, match="the import's staged events expired"):
        await imported(log, text, tenant=tenant)
    (stream_id,) = attempted
    assert stream_id == source if tenant is None else stream_id != source
    assert await store.exists(*keys.generation_keys(stream_id)) == 0
    assert await stored_keys(store, stream_id) == []
    assert await indexed(store, stream_id, tenant or "") == [None] * len(
        keys.index_keys(tenant or "")
    )
    assert stream_id not in await listed(log, tenant)


async def test_a_listing_while_the_record_is_on_its_way_does_not_unlist_the_import(
    redis_cluster: RedisClusterSet,
    store: RedisCluster,
    log: GenerationLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A listing drops an entry without a record once its score is older than a create's
    two steps could take; an imported stream's score is its creation time, a day ago."""
    rows = archives.build(TEXTS, created_at_ms=now_ms() - 24 * 3600 * 1000)
    place = archive._Staging._place

    async def listed_meanwhile(staging: archive._Staging, meta: dict[str, str]) -> None:
        assert staging.stream_id not in await listed(log, "tenant-c")
        assert await store.zscore(keys.tenant_index_key("tenant-c"), staging.stream_id) is None
        await place(staging, meta)

    monkeypatch.setattr(archive._Staging, "_place", listed_meanwhile)
    stream_id = await imported(log, archives.dumps(rows), tenant="tenant-c")
    assert stream_id in await listed(log, "tenant-c")
    assert None not in await indexed(store, stream_id, "tenant-c")
