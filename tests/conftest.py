from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import fakeredis
import fakeredis.aioredis
import httpx
import pytest
import redis.asyncio as aioredis
from playwright.sync_api import Browser

from broker.generation_log import GenerationLog
from tests.support.browser import OpenPage, Pages, chromium
from tests.support.client_libraries import UpstreamBroker
from tests.support.cluster import RedisClusterSet, shared_cluster
from tests.support.deployment import Deployment, running_deployment
from tests.support.node import NodeBroker, node_or_skip
from tests.support.processes import Launcher, broker_on_upstream
from tests.support.redis_server import RedisServer, running_server
from tests.support.replication import Failover, failover_pair
from tests.support.shared import SHARED


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the shared setups the next test does not use (``tests.support.shared``)."""
    SHARED.release_unneeded(getattr(nextitem, "fixturenames", ()))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish() -> None:
    """Stop what is still shared (a run stopped early), before the session's redis-server."""
    SHARED.close()


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
async def log() -> AsyncIterator[GenerationLog]:
    """A ``GenerationLog`` on a fakeredis of its own (the generate job's tests; a module that
    wants one on the real redis-server defines its own ``log``)."""
    redis = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    yield GenerationLog(redis, retention_seconds=600)
    await redis.aclose()


@pytest.fixture
def launch(redis_server: RedisServer) -> Iterator[Launcher]:
    """The factory of what a test runs against, on the session's redis-server: api and
    worker processes (``launch.api()``, ``launch.worker()``, ``launch.api_and_worker()``)
    and the real app in-process (``launch.app(env)``, a ``TestClient``). Everything it
    started is stopped after the test, whatever the test killed meanwhile."""
    with Launcher(redis_server.url) as launcher:
        yield launcher


@pytest.fixture
def deployment(redis_server: RedisServer) -> Deployment:
    """Two api front-ends, a worker and the local OpenAI upstream (``tests.support.deployment``),
    shared by consecutive tests (the ``test_e2e_*`` modules: ``tests.support.shared``)."""
    return SHARED.get("deployment", lambda: running_deployment(redis_server.url))


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


# ---------------------------------------------------------------------- client libraries


@pytest.fixture
def broker(redis_server: RedisServer) -> UpstreamBroker:
    """An api and a worker whose upstream is the local ``OpenAIServer``, shared by consecutive
    tests (the ``test_clients_python_*`` modules; ``tests.support.client_libraries``)."""
    api, upstream = SHARED.get("broker", lambda: broker_on_upstream(redis_server.url))
    return UpstreamBroker(api, upstream)


@pytest.fixture
def node_broker(redis_server: RedisServer) -> NodeBroker:
    """The same for the ``test_clients_node_*`` modules (skipped locally without ``npm ci``),
    with a 10 ms ``retry:``: EventSource waits that long before each reconnect, which keeps
    cut streams quick."""
    node_or_skip()
    env = {"BROKER_RETRY_MS": "10"}
    api, upstream = SHARED.get("node_broker", lambda: broker_on_upstream(redis_server.url, env))
    return NodeBroker(api, upstream)


@pytest.fixture
async def pair() -> AsyncIterator[Failover]:
    """A master and its replica on free ports, with a log on each: a failover is the
    replica's promotion at the moment a test chooses (``tests.support.replication``)."""
    async with failover_pair() as failover:
        yield failover


# ---------------------------------------------------------------------- Redis Clusters


@pytest.fixture
def redis_cluster() -> RedisClusterSet:
    """Three masters without replicas (``tests.support.cluster``), shared by consecutive
    tests (``tests.support.shared``: forming one takes seconds); whole and empty for each."""
    return shared_cluster("redis_cluster", masters=3)


@pytest.fixture
def replicated_cluster() -> RedisClusterSet:
    """Three masters with a replica each, shared the same way: a test may fail it over, kill
    or freeze its nodes; the next one gets it whole again (``RedisClusterSet.make_whole``)."""
    return shared_cluster("replicated_cluster", masters=3, replicas_per_master=1)


# ---------------------------------------------------------------------- PostgreSQL (archive)
# Its import is here, beside the fixtures that use it: one block, at the end of the file.

from tests.support.postgres import (  # noqa: E402
    PostgresServer,
    running_postgres,
    scratch_database,
    shared_or_fail,
)


@pytest.fixture
def archive_url() -> Iterator[str]:
    """The URL of a new database of its own on the shared PostgreSQL server (``SHARED_URL``,
    ``STREAMBROKER_TEST_POSTGRES_URL``), dropped after the test (``scratch_database``); when
    that server cannot be reached, skipped locally, failed under CI."""
    with scratch_database(shared_or_fail()) as url:
        yield url


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    """A private PostgreSQL cluster on a free port, started, for a test that stops, kills and
    restarts it (``tests.support.postgres.PostgresServer``); killed and removed after. Without
    the binaries, skipped locally, failed under CI."""
    with running_postgres() as server:
        yield server
