"""End to end with a real api process on its own Redis database and no worker (the
``lonely_api`` fixture), so generations stay queued: a cancel ends a queued generation in
the api itself, a watcher ends when its generation disappears, a resume point past the end
of a live stream is refused, and 300 watching clients share the front-end's few Redis
connections."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import httpx
import pytest

from tests.support.generations import create, state
from tests.support.processes import ApiProcess, Launcher
from tests.support.redis_server import RedisServer
from tests.support.sse import watch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture(scope="module")
def lonely_api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    """A front-end on its own Redis database with no worker: generations stay queued."""
    with Launcher(redis_server.url) as launch:
        database_7 = redis_server.url.rsplit("/", 1)[0] + "/7"
        yield launch.api({"BROKER_HEARTBEAT_SECONDS": "0.2"}, redis_url=database_7)


async def test_cancelling_a_queued_generation_ends_it_without_a_worker(
    lonely_api: ApiProcess, client: httpx.AsyncClient
) -> None:
    """Regression (review 1.5): a queued generation only ended once a worker was free."""
    stream_id = await create(client, lonely_api.url)
    assert (await state(client, lonely_api.url, stream_id))["status"] == "queued"
    response = await client.post(f"{lonely_api.url}/v1/streams/{stream_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    seen = await watch(client, lonely_api.url, stream_id)
    assert [e.type for e in seen.events] == ["metadata", "done"]
    assert seen.events[-1].data["finish_reason"] == "cancelled"
    assert seen.events[-1].data["usage"]["completion_tokens"] == 0


async def test_a_watcher_ends_when_its_generation_disappears(
    lonely_api: ApiProcess, client: httpx.AsyncClient, redis_server: RedisServer
) -> None:
    """Regression (review 1.3): a watcher of an expired or deleted stream pinged forever."""
    import redis.asyncio as aioredis

    from broker import keys

    stream_id = await create(client, lonely_api.url)
    store = aioredis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/7")
    try:
        url = f"{lonely_api.url}/v1/streams/{stream_id}/events"
        with anyio.fail_after(10):
            async with client.stream("GET", url) as response:
                chunks = response.aiter_text()
                assert (await anext(chunks)) == ": ping\n"  # open (queued: no event yet)
                await store.delete(*keys.generation_keys(stream_id))
                rest = "".join([chunk async for chunk in chunks])
    finally:
        await store.aclose()
    assert "event:" not in rest
    gone = await client.get(url)
    assert gone.status_code == 404


async def test_a_resume_point_past_the_end_of_a_live_stream_is_refused(
    lonely_api: ApiProcess, client: httpx.AsyncClient
) -> None:
    """A client holding an id the log does not have saw events the store lost (or was
    never sent it): waiting for that id would silently skip what comes before it, and
    continuing would put other text under ids it has. The answer is an explicit 410."""
    stream_id = await create(client, lonely_api.url)
    url = f"{lonely_api.url}/v1/streams/{stream_id}/events"
    response = await client.get(url, headers={"Last-Event-ID": "5"})
    assert response.status_code == 410
    assert response.json()["error"]["code"] == "log_lost"
    assert "no event 5" in response.json()["error"]["message"]


async def test_redis_connections_of_a_front_end_do_not_grow_with_its_clients(
    lonely_api: ApiProcess, redis_server: RedisServer
) -> None:
    """300 clients watching (the stream stays queued: no worker on this database) use the
    hub's one connection and the bounded pool, not one connection each."""
    import contextlib

    import redis.asyncio as aioredis

    async with httpx.AsyncClient(
        timeout=30, limits=httpx.Limits(max_connections=None, max_keepalive_connections=0)
    ) as many:
        stream_id = await create(many, lonely_api.url)
        url = f"{lonely_api.url}/v1/streams/{stream_id}/events"
        async with contextlib.AsyncExitStack() as open_streams:
            for _ in range(300):
                response = await open_streams.enter_async_context(many.stream("GET", url))
                assert response.status_code == 200
            store = aioredis.Redis.from_url(redis_server.url)
            try:
                clients = await store.client_list()
            finally:
                await store.aclose()
            held = [c for c in clients if c["db"] == "7"]
            assert 1 <= len(held) <= 8 + 1, [c["name"] for c in held]
            assert [c["name"] for c in held].count("streambroker-hub") == 1
