"""Thousands of event connections opened and closed leave nothing behind: no task, no
subscription, no reader object, and no memory growth beyond noise (the api runs in-process
under a real uvicorn server, so its tasks and objects can be counted)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
import uvicorn

from api.app import create_app
from api.hub import ReaderHub, Subscription
from broker.settings import ApiSettings, Settings
from tests.support.redis_server import RedisServer, free_port
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

CONNECTIONS = 2000
WARM_UP = 500
AT_ONCE = 100


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@contextlib.asynccontextmanager
async def served(redis_url: str) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    settings = Settings(redis_url=redis_url, api=ApiSettings(heartbeat_seconds=5))
    port = free_port()
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    try:
        # uvicorn offers no event for this; a server that stopped instead raises its error.
        await eventually_async(lambda: server.started or task.done(), timeout=10)
        assert server.started, task.result()
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await task


async def open_and_close(client: httpx.AsyncClient, url: str, count: int) -> None:
    """``count`` clients that connect, read the first bytes, and hang up."""
    semaphore = asyncio.Semaphore(AT_ONCE)

    async def one() -> None:
        async with semaphore, client.stream("GET", url) as response:
            assert response.status_code == 200
            async for _ in response.aiter_bytes():
                break  # the opening ping: connected; now hang up

    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(one)


async def settled(hub: ReaderHub, tasks_at_most: int | None = None) -> None:
    """Wait, with a deadline, until every closed connection's response has finished: no
    subscription left, and (when given) no more tasks than before the connections."""
    await eventually_async(
        lambda: (
            not hub.subscriber_count
            and (tasks_at_most is None or len(asyncio.all_tasks()) <= tasks_at_most)
        ),
        timeout=10,
        interval=0.02,
    )


def live_objects(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


async def test_thousands_of_closed_connections_leave_no_task_or_memory_behind(
    redis_server: RedisServer,
) -> None:
    limits = httpx.Limits(max_connections=AT_ONCE, max_keepalive_connections=0)
    async with (
        served(redis_server.url) as (base, app),
        httpx.AsyncClient(timeout=30, limits=limits) as client,
    ):
        created = await client.post(
            f"{base}/v1/streams",
            json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
        )
        url = f"{base}/v1/streams/{created.json()['id']}/events"
        hub = app.state.services.hub
        # Warm-up: pools, caches, and the allocator's arenas reach their working size.
        await open_and_close(client, url, WARM_UP)
        await settled(hub)
        tasks_before, rss_before = len(asyncio.all_tasks()), rss_bytes()

        await open_and_close(client, url, CONNECTIONS)

        # Fails by its deadline if a subscription or a task never goes away.
        await settled(hub, tasks_at_most=tasks_before)
        # RSS first: counting objects allocates a list of all of them.
        growth = rss_bytes() - rss_before
        assert live_objects(Subscription) == 0
    # A leak of even 5 KB per connection would be 10 MB here.
    assert growth < 8 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB"
