from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis.asyncio as aioredis
from playwright.sync_api import Browser

from tests.support.browser import OpenPage, Pages, chromium
from tests.support.processes import Launcher
from tests.support.redis_server import RedisServer, running_server


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with running_server() as server:
        yield server


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the session's private redis-server, flushed before each test."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def launch(redis_server: RedisServer) -> Iterator[Launcher]:
    """The factory of what a test runs against, on the session's redis-server: api and
    worker processes (``launch.api()``, ``launch.worker()``, ``launch.api_and_worker()``)
    and the real app in-process (``launch.app(env)``, a ``TestClient``). Everything it
    started is stopped after the test, whatever the test killed meanwhile."""
    with Launcher(redis_server.url) as launcher:
        yield launcher


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for tests that talk to real processes."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(30)) as client:
        yield client


# ------------------------------------------------------------------------------ browsers


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium for one module (Playwright's sync API owns the thread's event loop
    while it runs, so it is not kept across modules of async tests)."""
    with chromium() as browser:
        yield browser


@pytest.fixture
def open_page(browser: Browser) -> Iterator[OpenPage]:
    """``open_page(proxy=None, api=None, **context_options)``: a new page in its own context
    (its own sessionStorage), closed after the test; see ``tests.support.browser.Pages``."""
    with Pages(browser) as pages:
        yield pages.open
