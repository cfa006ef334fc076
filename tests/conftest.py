from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis

from tests.support.processes import BrokerProcess, stop_all
from tests.support.redis_server import RedisServer, start_or_fail


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_or_fail()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the session's private redis-server, flushed before each test."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def processes() -> Iterator[list[BrokerProcess]]:
    """Broker processes a test starts (and may kill); whatever is left is stopped after."""
    started: list[BrokerProcess] = []
    yield started
    stop_all(started)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for tests that talk to real processes (modules may define their own)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(30)) as client:
        yield client
