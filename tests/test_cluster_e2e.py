"""The whole broker on a Redis Cluster: two api processes and two workers on
``REDIS_URL=redis+cluster://…`` (three masters, ``tests.support.cluster``).

- Generations spread over every master; readers that cut and resume with ``Last-Event-ID``
  on either api process end with the exact text and one terminal event, no event twice.
- A listing returns every generation, page after page.
- The reader hub of an api process holds one Pub/Sub connection per node it reads from,
  however many clients watch.
- Cancel, tenants (auth, the per-tenant connection limit), export then import, and timed
  replay work as on one Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from api.hub import HUB_CLIENT_NAME
from broker import keys
from tests.support.cluster import RedisClusterSet, running_cluster
from tests.support.failover_readers import FailoverReader, tally
from tests.support.generations import bearer, create, expected_text
from tests.support.processes import ApiProcess, Launcher
from tests.support.sse import token_text, watch
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.e2e]

GENERATIONS = 32
TOKENS = 120
KEY_A = "key-of-tenant-a-0123456789"
KEY_B = "key-of-tenant-b-0123456789"
ENV = {
    "BROKER_HEARTBEAT_SECONDS": "0.5",
    "BROKER_API_KEYS": f"{KEY_A}:tenant-a,{KEY_B}:tenant-b",
    "BROKER_READ_TOKEN_SECRETS": "s" * 32,
    "BROKER_MAX_CONNECTIONS_PER_TENANT": "40",
    "BROKER_CONNECTION_SLOT_SECONDS": "3",
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterSet]:
    with running_cluster(masters=3) as formed:
        yield formed


@pytest.fixture(scope="module")
def apis(cluster: RedisClusterSet) -> Iterator[list[ApiProcess]]:
    with Launcher(cluster.url) as launch:
        apis = [launch.api(ENV), launch.api(ENV)]
        launch.worker(ENV)
        launch.worker(ENV)
        yield apis


def hub_connections(cluster: RedisClusterSet) -> dict[int, int]:
    """Per master: how many connections reader hubs hold to it."""
    counts = {}
    for port in cluster.masters():
        with redis.Redis(port=port) as node:
            clients = node.client_list()
        counts[port] = sum(1 for c in clients if c.get("name") == HUB_CLIENT_NAME)
    return counts


async def test_readers_that_cut_and_resume_get_every_generation_exactly(
    cluster: RedisClusterSet, apis: list[ApiProcess]
) -> None:
    bases = [api.url for api in apis]
    async with httpx.AsyncClient(timeout=30, headers=bearer(KEY_A)) as client:
        ids = [
            await create(client, bases[n % 2], key=KEY_A, max_tokens=TOKENS, rate=80, seed=n)
            for n in range(GENERATIONS)
        ]
        owners = {cluster.owner_of(keys.meta_key(stream_id)) for stream_id in ids}
        assert owners == set(cluster.masters()), "the generations live on every master"

        readers = [
            FailoverReader(client, bases, stream_id, expected_text(TOKENS, n), seat=n)
            for n, stream_id in enumerate(ids)
        ]
        deadline = time.monotonic() + 60
        running = [asyncio.create_task(reader.run(deadline)) for reader in readers]
        # While they read: each api process's hub holds one connection per master at most.
        await eventually_async(
            lambda: all(reader.tokens for reader in readers), timeout=30, what="every reader read"
        )
        during = hub_connections(cluster)
        results = await asyncio.gather(*running)

    counts = tally(results)
    assert counts["completed"] == GENERATIONS, counts
    for reader, result in zip(readers, results, strict=True):
        assert result.text == reader.expected_text, result
        assert result.repeated == 0, result
    assert sum(r.connections for r in results) > GENERATIONS, "the readers did cut"
    assert all(count <= len(apis) for count in during.values()), during
    assert sum(during.values()) >= len(during), "the hubs do listen"
    print(f"\nhub connections per master while {GENERATIONS} readers watched: {during}")


async def test_a_reader_keeps_its_stream_when_the_slot_moves_to_another_master(
    cluster: RedisClusterSet, apis: list[ApiProcess]
) -> None:
    """Resharding under a live reader: the hub is unsubscribed by the old owner, subscribes
    where the slot went, and the reader gets every event, in order, once."""
    async with httpx.AsyncClient(timeout=30, headers=bearer(KEY_A)) as client:
        stream_id = await create(client, apis[0].url, key=KEY_A, max_tokens=200, rate=40, seed=9)
        reader = FailoverReader(
            client, [apis[0].url], stream_id, expected_text(200, 9), cut_after=(60, 60)
        )
        reading = asyncio.create_task(reader.run(time.monotonic() + 40))
        await eventually_async(lambda: reader.tokens > 0, timeout=20, what="the reader reads")
        slot = cluster.slot_of(keys.meta_key(stream_id))
        old = cluster.owner(slot)
        new = next(port for port in cluster.masters() if port != old)
        await asyncio.to_thread(cluster.move_slot, slot, new)
        moved_at_tokens = reader.tokens
        result = await reading
    assert moved_at_tokens < 200, "the slot moved while the stream was live"
    assert result.outcome == "completed", result
    assert result.text == expected_text(200, 9)
    assert result.repeated == 0
    assert result.connections == 1, "no reconnect was needed"
    assert f"its slot left 127.0.0.1:{old}" in apis[0].output()


async def test_a_listing_returns_every_generation_page_by_page(
    apis: list[ApiProcess],
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        made = {await create(client, apis[0].url, key=KEY_B, max_tokens=2) for _ in range(12)}
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": "5", **({"cursor": cursor} if cursor else {})}
            page = await client.get(
                f"{apis[1].url}/v1/streams", params=params, headers=bearer(KEY_B)
            )
            assert page.status_code == 200, page.text
            seen += [state["id"] for state in page.json()["data"]]
            cursor = page.json()["next_cursor"]
            if not cursor:
                break
    assert set(seen) == made, "tenant b's listing is exactly its own generations"
    assert len(seen) == len(set(seen))


async def test_cancel_ends_a_running_generation_with_one_terminal_event(
    apis: list[ApiProcess],
) -> None:
    async with httpx.AsyncClient(timeout=30, headers=bearer(KEY_A)) as client:
        stream_id = await create(client, apis[0].url, key=KEY_A, max_tokens=5000, rate=50)
        first = await watch(client, apis[1].url, stream_id, stop_after=3)
        assert len(first.events) == 3
        cancelled = await client.post(f"{apis[1].url}/v1/streams/{stream_id}/cancel")
        assert cancelled.status_code in (200, 202), cancelled.text
        seen = await watch(client, apis[0].url, stream_id)
    assert seen.ended
    terminal = [event for event in seen.events if event.type in ("done", "error")]
    assert len(terminal) == 1
    assert terminal[0].data["finish_reason"] == "cancelled"


async def test_tenants_see_only_their_own_and_are_held_to_their_connection_limit(
    cluster: RedisClusterSet, apis: list[ApiProcess]
) -> None:
    limit = int(ENV["BROKER_MAX_CONNECTIONS_PER_TENANT"])
    async with httpx.AsyncClient(timeout=30) as client:
        theirs = await create(client, apis[0].url, key=KEY_B, max_tokens=4)
        mine = await client.get(f"{apis[1].url}/v1/streams/{theirs}", headers=bearer(KEY_A))
        assert mine.status_code == 404, mine.text

        long_id = await create(client, apis[0].url, key=KEY_A, max_tokens=2000, rate=20)
        url = f"{{}}/v1/streams/{long_id}/events"
        async with asyncio.TaskGroup() as group:
            held: list[httpx.Response] = []
            streams = []
            for n in range(limit):
                stream = client.stream("GET", url.format(apis[n % 2].url), headers=bearer(KEY_A))
                streams.append(stream)
                held.append(await stream.__aenter__())
            assert all(response.status_code == 200 for response in held)
            over = await client.get(url.format(apis[1].url), headers=bearer(KEY_A))
            other_tenant = await client.get(
                f"{apis[0].url}/v1/streams/{theirs}/events", headers=bearer(KEY_B)
            )
            for stream in streams:
                group.create_task(stream.__aexit__(None, None, None))
        assert over.status_code == 429, over.text
        assert other_tenant.status_code == 200, "another tenant's limit is its own"
        await client.post(f"{apis[0].url}/v1/streams/{long_id}/cancel", headers=bearer(KEY_A))


async def test_export_then_import_and_replay(apis: list[ApiProcess]) -> None:
    async with httpx.AsyncClient(timeout=30, headers=bearer(KEY_A)) as client:
        stream_id = await create(client, apis[0].url, key=KEY_A, max_tokens=30, rate=300, seed=7)
        original = await watch(client, apis[1].url, stream_id)
        exported = await client.get(f"{apis[1].url}/v1/streams/{stream_id}/export")
        assert exported.status_code == 200, exported.text

        imported = await client.post(
            f"{apis[0].url}/v1/streams/import",
            content=exported.content,
            headers={"content-type": "application/x-ndjson"},
        )
        assert imported.status_code == 201, imported.text
        copy_id = imported.json()["id"]
        assert copy_id != stream_id, "an import under a tenant gets an id of its own"
        copy = await watch(client, apis[1].url, copy_id)
        assert token_text(copy.events) == token_text(original.events) == expected_text(30, 7)
        assert [e.type for e in copy.events] == [e.type for e in original.events]

        lines = exported.content.decode().splitlines()
        header = json.loads(lines[0])
        listed = await client.get(f"{apis[1].url}/v1/streams", params={"limit": "100"})
        assert copy_id in {state["id"] for state in listed.json()["data"]}

        replayed = await client.get(
            f"{apis[0].url}/v1/streams/{copy_id}/events", params={"replay": "1000"}
        )
        assert replayed.status_code == 200
        assert replayed.text.count("event: token") == sum(
            1 for e in original.events if e.type == "token"
        )
        assert header["id"] == stream_id


async def test_readyz_answers_ready_while_every_master_takes_writes(
    apis: list[ApiProcess],
) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        for api in apis:
            answer = await client.get(f"{api.url}/readyz")
            assert answer.status_code == 200, answer.text


async def test_a_cluster_of_one_master_serves_and_is_ready() -> None:
    """One master given every slot: a cluster without failover, which redis-py answers
    differently (a command for "every master" gets one reply, not one per node)."""
    with running_cluster(masters=1) as single, Launcher(single.url) as launch:
        api = launch.api(ENV)  # waits for /readyz to answer 200
        launch.worker(ENV)
        async with httpx.AsyncClient(timeout=30, headers=bearer(KEY_A)) as client:
            ready = await client.get(f"{api.url}/readyz")
            stream_id = await create(client, api.url, key=KEY_A, max_tokens=20, seed=3)
            seen = await watch(client, api.url, stream_id)
    assert ready.status_code == 200, ready.text
    assert token_text(seen.events) == expected_text(20, 3)
