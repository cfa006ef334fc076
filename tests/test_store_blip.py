"""A Redis blip shorter than the lease changes nothing: generations streaming through it all
complete, and their readers (resuming with ``Last-Event-ID``) get the exact text once.

Between the broker's processes (an api and a worker) and the real redis-server stands a
``BlipProxy``: mid-generation it drops every connection and refuses new ones for 1.5 s.
Before the writers rode outages out, the first lease renewal that met the blip ended every
running generation with ``internal_error``.
"""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis

from broker.client import AsyncClient, Backoff, Done, StreamFailed, Token
from broker.state import GenerationState
from tests.support.blip_proxy import BlipProxy
from tests.support.generations import MESSAGES, expected_text
from tests.support.processes import Launcher
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]

GENERATIONS = 6
MAX_TOKENS = 120
OUTAGE_SECONDS = 1.5


async def test_a_redis_blip_mid_generation_ends_nothing(
    redis_server: RedisServer, launch: Launcher
) -> None:
    with BlipProxy(redis_server.port) as proxy:
        # The default 5 s lease: the 1.5 s outage is well inside it.
        api = launch.api(redis_url=proxy.url)
        launch.worker(redis_url=proxy.url)
        texts: dict[str, str] = {}
        terminals: dict[str, list[object]] = {}
        streaming = {seed: anyio.Event() for seed in range(GENERATIONS)}
        backoff = Backoff(initial=0.1, maximum=0.5, give_up_after=60)
        async with AsyncClient(api.url, backoff=backoff) as sb:
            ids = {}
            for seed in range(GENERATIONS):
                created = await sb.create(
                    "fake",
                    MESSAGES,
                    max_tokens=MAX_TOKENS,
                    fake={"tokens_per_second": 40, "seed": seed},
                )
                ids[seed] = created.id

            async def read(seed: int) -> None:
                stream_id = ids[seed]
                texts[stream_id], terminals[stream_id] = "", []
                async for event in sb.watch(stream_id):
                    if isinstance(event, Token):
                        texts[stream_id] += event.text
                        if len(texts[stream_id]) > 20:
                            streaming[seed].set()
                    elif isinstance(event, Done | StreamFailed):
                        terminals[stream_id].append(event)

            with anyio.fail_after(60):
                async with anyio.create_task_group() as readers:
                    for seed in ids:
                        readers.start_soon(read, seed)
                    for started in streaming.values():
                        await started.wait()
                    await anyio.to_thread.run_sync(proxy.blip, OUTAGE_SECONDS)

    assert proxy.blips == 1
    for seed, stream_id in ids.items():
        assert len(terminals[stream_id]) == 1, terminals[stream_id]
        (terminal,) = terminals[stream_id]
        assert isinstance(terminal, Done), terminal
        assert texts[stream_id] == expected_text(MAX_TOKENS, seed)
    # What the store holds agrees with what readers got (read past the proxy).
    store = aioredis.Redis.from_url(redis_server.url)
    try:
        for seed, stream_id in ids.items():
            raw = await store.hgetall(f"sb:{{{stream_id}}}:meta")
            text = await store.get(f"sb:{{{stream_id}}}:text")
            stored = GenerationState.from_hash(raw, text)
            assert stored.status.value == "completed"
            assert stored.text == expected_text(MAX_TOKENS, seed)
    finally:
        await store.aclose()
