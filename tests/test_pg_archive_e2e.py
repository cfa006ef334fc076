"""Recordings outlive Redis, with real processes: an api and a worker archiving to a real
PostgreSQL (a scratch database of the shared server). Generations finish, are archived, and
their Redis keys go; then every read path answers byte for byte as it did while Redis held
them (a capture taken then): the state, the events from any resume point in every format, a
replay, the export, the listing across hot and archived generations; a ``FLUSHALL`` changes
nothing for them; tenants and read tokens apply as before.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from broker import keys
from tests.support.generations import bearer, create, state
from tests.support.processes import Launcher, run_cli
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]

DEADLINE = 60.0
#: Long enough to take the capture while Redis holds them, short enough for a test.
AFTER_SECONDS = 4


def archiving(archive_url: str, **more: str) -> dict[str, str]:
    return {
        "BROKER_ARCHIVE_URL": archive_url,
        "BROKER_ARCHIVE_AFTER_SECONDS": str(AFTER_SECONDS),
        "BROKER_SWEEP_SECONDS": "0.2",
        **more,
    }


@pytest.fixture
async def store(launch: Launcher) -> AsyncIterator[aioredis.Redis]:
    launch.flush()
    redis = aioredis.from_url(launch.redis_url)
    yield redis
    await redis.aclose()


async def finished(
    client: httpx.AsyncClient, api: str, stream_id: str, key: str | None = None
) -> None:
    async def done() -> bool:
        answer = await client.get(f"{api}/v1/streams/{stream_id}", headers=bearer(key))
        return answer.json()["status"] in ("completed", "failed", "cancelled")

    await eventually_async(done, timeout=DEADLINE, what=f"{stream_id} finished")


async def let_go(store: aioredis.Redis, stream_ids: list[str]) -> None:
    """Wait until Redis holds none of them any more (archived, then dropped)."""

    async def gone() -> bool:
        return not await store.exists(*[keys.meta_key(i) for i in stream_ids])

    await eventually_async(gone, timeout=DEADLINE, what="the archived keys deleted")


@dataclass(frozen=True)
class Read:
    status: int
    body: bytes


#: Every read of one generation a capture takes: (name, path with {id}, headers).
def reads(last: int) -> list[tuple[str, str, dict[str, str]]]:
    middle = str(last // 2)
    return [
        ("events", "/v1/streams/{id}/events", {}),
        ("events after 1", "/v1/streams/{id}/events", {"Last-Event-ID": "1"}),
        ("events mid", "/v1/streams/{id}/events", {"Last-Event-ID": middle}),
        ("events at the end", "/v1/streams/{id}/events", {"Last-Event-ID": str(last)}),
        ("events past the end", "/v1/streams/{id}/events", {"Last-Event-ID": str(last + 5)}),
        ("query resume", f"/v1/streams/{{id}}/events?last_event_id={middle}", {}),
        ("openai", "/v1/streams/{id}/events?format=openai", {}),
        ("openai mid", "/v1/streams/{id}/events?format=openai", {"Last-Event-ID": middle}),
        ("ai-sdk", "/v1/streams/{id}/events?format=ai-sdk", {}),
        ("ai-sdk mid", "/v1/streams/{id}/events?format=ai-sdk", {"Last-Event-ID": middle}),
        ("replay", "/v1/streams/{id}/events?replay=50", {}),
        ("export", "/v1/streams/{id}/export", {}),
    ]


async def capture(
    client: httpx.AsyncClient, api: str, stream_id: str, last: int
) -> dict[str, Read]:
    taken = {}
    for name, path, headers in reads(last):
        answer = await client.get(api + path.format(id=stream_id), headers=headers)
        # A replay's keep-alive comments come as its pace and the clock have them.
        body = answer.content.replace(b": ping\n", b"") if "replay" in path else answer.content
        taken[name] = Read(answer.status_code, body)
    return taken


def without_counters(export: Read) -> tuple[int, dict[str, Any], bytes]:
    """An export with its header's connection counters left out (the capture's own reads
    moved them on); the events' lines as they are."""
    header, _, lines = export.body.partition(b"\n")
    fields = json.loads(header)
    for name in ("connections", "resumes"):
        fields["meta"].pop(name)
    return export.status, fields, lines


async def test_archived_generations_read_exactly_as_they_did_from_redis(
    launch: Launcher, client: httpx.AsyncClient, store: aioredis.Redis, archive_url: str
) -> None:
    api = launch.api(archiving(archive_url)).url
    launch.worker(archiving(archive_url))
    ids = [
        await create(client, api, max_tokens=30, seed=seed, metadata={"run": str(seed % 2)})
        for seed in range(3)
    ]
    # One ends failed, one cancelled: every terminal kind is archived alike.
    failing = await create(client, api, max_tokens=30, seed=5, fail_after_tokens=4)
    slow = await create(client, api, max_tokens=400, rate=20, seed=6)
    await client.post(f"{api}/v1/streams/{slow}/cancel")
    ids += [failing, slow]
    hot: dict[str, dict[str, Read]] = {}
    for stream_id in ids:
        await finished(client, api, stream_id)
        last = (await state(client, api, stream_id))["last_event_id"]
        hot[stream_id] = await capture(client, api, stream_id, last)
    hot_states = {i: (await client.get(f"{api}/v1/streams/{i}")).content for i in ids}
    hot_listing = (await client.get(f"{api}/v1/streams?limit=100")).json()

    await let_go(store, ids)

    for stream_id in ids:
        # The state first: reading events counts connections, as it did in Redis.
        assert (await client.get(f"{api}/v1/streams/{stream_id}")).content == hot_states[stream_id]
        last = (await state(client, api, stream_id))["last_event_id"]
        cold = await capture(client, api, stream_id, last)
        for name, read in hot[stream_id].items():
            if name == "export":
                assert without_counters(cold[name]) == without_counters(read), stream_id
            else:
                assert cold[name] == read, f"{stream_id} {name}"
    assert hot[ids[0]]["events at the end"].status == 204
    assert hot[ids[0]]["events past the end"].status == 410
    cold_listing = (await client.get(f"{api}/v1/streams?limit=100")).json()
    assert [s["id"] for s in cold_listing["data"]] == [s["id"] for s in hot_listing["data"]]

    # Redis forgets everything: the archive does not.
    await store.flushall()
    for stream_id in ids:
        answer = await client.get(f"{api}/v1/streams/{stream_id}/events")
        assert answer.content == hot[stream_id]["events"].body
    cancelled = await client.post(f"{api}/v1/streams/{slow}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"

    # The operator's command line reads them as before.
    first = ids[0]
    exported = run_cli("export", first, "--url", api)
    assert exported.returncode == 0, exported.stderr
    assert without_counters(Read(200, exported.stdout)) == without_counters(hot[first]["export"])
    listed = run_cli("ls", "--all", "--json", "--url", api, text=True)
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [
        s["id"] for s in hot_listing["data"]
    ]
    tailed = run_cli("tail", first, "--no-progress", "--url", api, text=True)
    assert tailed.returncode == 0, tailed.stderr
    assert tailed.stdout.strip() == (await state(client, api, first))["text"].strip()


async def test_one_listing_pages_through_hot_and_archived_generations_with_filters(
    launch: Launcher, client: httpx.AsyncClient, store: aioredis.Redis, archive_url: str
) -> None:
    api = launch.api(archiving(archive_url)).url
    launch.worker(archiving(archive_url))
    older = [
        await create(client, api, max_tokens=5, seed=i, metadata={"batch": "old", "n": str(i % 2)})
        for i in range(5)
    ]
    for stream_id in older:
        await finished(client, api, stream_id)
    await let_go(store, older)
    newer = [
        await create(client, api, max_tokens=5, seed=i, metadata={"batch": "new", "n": str(i % 2)})
        for i in range(4)
    ]
    for stream_id in newer:
        await finished(client, api, stream_id)
    everything = list(reversed(older + newer))  # newest first

    async def pages(query: str, size: int) -> list[str]:
        seen: list[str] = []
        cursor = None
        while True:
            url = f"{api}/v1/streams?limit={size}{query}"
            answer = await client.get(url + (f"&cursor={cursor}" if cursor else ""))
            assert answer.status_code == 200, answer.text
            page = answer.json()
            seen += [s["id"] for s in page["data"]]
            cursor = page.get("next_cursor")
            if not cursor:
                return seen

    for size in (1, 2, 3, 100):
        assert await pages("", size) == everything, size
    odd = [i for i in everything if i in older[1::2] + newer[1::2]]
    assert await pages("&metadata.n=1", 2) == odd
    assert await pages("&metadata.batch=old", 2) == list(reversed(older))
    assert await pages("&status=completed", 4) == everything


async def test_tenants_and_read_tokens_apply_to_archived_generations(
    launch: Launcher, client: httpx.AsyncClient, store: aioredis.Redis, archive_url: str
) -> None:
    auth = {
        "BROKER_API_KEYS": "key-tenant-a-0123456789:tenant-a,key-tenant-b-0123456789:tenant-b",
        "BROKER_READ_TOKEN_SECRETS": "s" * 40,
    }
    # One read is taken while Redis holds it, right after the end: a second is enough.
    quick = {**auth, "BROKER_ARCHIVE_AFTER_SECONDS": "1"}
    api = launch.api(archiving(archive_url, **quick)).url
    launch.worker(archiving(archive_url, **quick))
    stream_id = await create(client, api, key="key-tenant-a-0123456789", max_tokens=10)
    token = (
        await client.post(
            f"{api}/v1/streams/{stream_id}/read_token", headers=bearer("key-tenant-a-0123456789")
        )
    ).json()["read_token"]
    await finished(client, api, stream_id, key="key-tenant-a-0123456789")
    hot = await client.get(
        f"{api}/v1/streams/{stream_id}/events", headers=bearer("key-tenant-a-0123456789")
    )
    await let_go(store, [stream_id])

    own = await client.get(
        f"{api}/v1/streams/{stream_id}/events", headers=bearer("key-tenant-a-0123456789")
    )
    assert own.content == hot.content
    other = await client.get(
        f"{api}/v1/streams/{stream_id}/events", headers=bearer("key-tenant-b-0123456789")
    )
    assert other.status_code == 404
    assert (
        await client.get(f"{api}/v1/streams/{stream_id}", headers=bearer("key-tenant-b-0123456789"))
    ).status_code == 404
    by_token = await client.get(f"{api}/v1/streams/{stream_id}/events?token={token}")
    assert by_token.content == hot.content
    listed_b = (
        await client.get(f"{api}/v1/streams", headers=bearer("key-tenant-b-0123456789"))
    ).json()["data"]
    assert listed_b == []
    listed_a = (
        await client.get(f"{api}/v1/streams", headers=bearer("key-tenant-a-0123456789"))
    ).json()["data"]
    assert [s["id"] for s in listed_a] == [stream_id]
