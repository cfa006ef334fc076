"""The broker behind Redis Sentinel, with the configuration it ships (``infra/sentinel/``):
a master, two replicas and three sentinels, real processes on free ports
(``tests.support.sentinel``), and real api and worker processes with
``REDIS_URL=redis+sentinel://...``.

- Generations are created and streamed end to end; every broker connection is on the master.
- After ``SENTINEL FAILOVER`` and after ``kill -9`` of the master, creates work again (answered
  and run to the end) within 15 s; the time is printed (``pytest -s``).
- The master killed under generations in flight: a failover of 3-4 s (the shipped
  ``down-after-milliseconds``) ends none of them: writers, reader hub and sweepers ride it
  out. ``SENTINEL FAILOVER`` under generations in flight ends them with ``done`` or an
  explicit ``log_lost``, never an ``internal_error``.
- The pieces: the api's pool keeps its cap behind Sentinel; open connections follow a new
  master before Sentinel itself reconfigures the old one; arq's own settings reach the master.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from arq.connections import create_pool

from broker import store_connections
from broker.client import APIError, AsyncClient, Backoff, Done, StreamFailed, Token
from broker.store_url import parse_store_url
from tests.support.failover import create_and_finish, seconds_until_creates_work
from tests.support.generations import MESSAGES, create_request, expected_text
from tests.support.processes import ApiProcess, BrokerProcess, Launcher, wait_ready
from tests.support.redis_server import free_port
from tests.support.sentinel import SentinelSet
from tests.support.shared import SHARED
from tests.support.sse import watch
from tests.support.stale_sentinel import stale_sentinel
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

BROKER_NAMES = ("streambroker-api", "streambroker-hub", "streambroker-worker")


@pytest.fixture
def sentinel_set() -> Iterator[SentinelSet]:
    """A fresh set per test that fails it over: a failover changes it for good."""
    with SentinelSet() as sentinels:
        yield sentinels


@pytest.fixture
def steady_set() -> SentinelSet:
    """A set that no test fails over, shared by the consecutive tests that only use it
    (``tests.support.shared``): forming one takes seconds, as the sentinels find each other
    by the hellos they send every 2 s."""
    sentinels = SHARED.get("steady_set", SentinelSet)
    assert sentinels.settled(), f"a test changed the steady set:\n{sentinels.describe()}"
    return sentinels


@pytest.fixture
def broker(sentinel_set: SentinelSet) -> Iterator[ApiProcess]:
    """An api process and a worker, both with ``REDIS_URL=redis+sentinel://…``."""
    with Launcher(sentinel_set.url) as launch:
        yield launch.api_and_worker()


@pytest.fixture
def steady_broker(steady_set: SentinelSet) -> Iterator[ApiProcess]:
    """The same on the steady set."""
    with Launcher(steady_set.url) as launch:
        yield launch.api_and_worker()


def client_names(port: int) -> list[str]:
    with redis.Redis(port=port, decode_responses=True) as node:
        return [c["name"] for c in node.client_list() if c["name"].startswith("streambroker")]


async def _port_of(client: aioredis.Redis) -> int:
    """The port of the node ``client``'s next command reaches."""
    return int((await client.config_get("port"))["port"])


@pytest.mark.e2e
async def test_generations_are_created_and_streamed_through_sentinel(
    steady_set: SentinelSet, steady_broker: ApiProcess
) -> None:
    """By the api and worker processes, then by ``streambroker dev`` on the same set."""
    sentinel_set, broker = steady_set, steady_broker
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(f"{broker.url}/v1/streams", json=create_request(max_tokens=30))
        assert answer.status_code == 201, answer.text
        seen = await watch(client, broker.url, answer.json()["id"])
    assert seen.events[-1].type == "done"
    assert "".join(e.data["text"] for e in seen.events if e.type == "token") == expected_text(30)
    master = sentinel_set.master_port()
    assert set(client_names(master)) == set(BROKER_NAMES)
    for port in sentinel_set.nodes:
        if port != master:
            assert client_names(port) == [], f"a broker connection to replica {port}"

    port = free_port()
    dev = BrokerProcess("dev", "--port", str(port), env={"REDIS_URL": sentinel_set.url}, name="dev")
    try:
        dev.start().wait_for_output("using REDIS_URL: the master of Sentinel service")
        wait_ready(f"http://127.0.0.1:{port}", check=dev.output)
        async with httpx.AsyncClient() as client:
            assert await create_and_finish(client, f"http://127.0.0.1:{port}")
    finally:
        dev.stop()


async def test_the_api_pool_keeps_its_cap_behind_sentinel(steady_set: SentinelSet) -> None:
    """Two connections at most: a third command waits for one, and gives up after the
    pool's wait (the api answers 503 then); all of them to the master."""
    sentinel_set = steady_set
    name = "streambroker-cap-test"
    capped = store_connections.bounded_pool(
        parse_store_url(sentinel_set.url), max_connections=2, wait_seconds=1, client_name=name
    )
    client = aioredis.Redis(connection_pool=capped)
    master = sentinel_set.master_port()

    def on_master() -> int:
        return sum(1 for n in client_names(master) if n == name)

    try:
        holding = [
            asyncio.create_task(client.blpop(["sb-test:nothing"], timeout=3)) for _ in range(2)
        ]
        await eventually_async(lambda: on_master() == 2, what="two blocked connections")
        started = time.monotonic()
        with pytest.raises(redis_errors.ConnectionError, match="No connection available"):
            await client.ping()
        assert time.monotonic() - started >= 0.9
        await asyncio.gather(*holding)
        assert await client.ping()
        assert on_master() == 2
        for port in sentinel_set.nodes:
            if port != master:
                assert client_names(port) == []
    finally:
        await capped.aclose()


async def test_arq_settings_reach_the_master(steady_set: SentinelSet) -> None:
    """What arq's own command line would connect with (``arq workers.worker.…``)."""
    settings = store_connections.arq_redis_settings(parse_store_url(steady_set.url))
    arq = await create_pool(settings)
    try:
        assert await _port_of(arq) == steady_set.master_port()
    finally:
        await arq.aclose()
        for sentinel in arq.connection_pool.sentinel_manager.sentinels:
            await sentinel.aclose()  # arq leaves its Sentinel client's connections open


@pytest.mark.e2e
async def test_after_sentinel_failover_creates_work_again_within_15_s(
    sentinel_set: SentinelSet, broker: ApiProcess
) -> None:
    await seconds_until_creates_work(
        sentinel_set.failover, sentinel_set, broker, "SENTINEL FAILOVER"
    )


@pytest.mark.e2e
async def test_after_kill_9_of_the_master_creates_work_again_within_15_s(
    sentinel_set: SentinelSet, broker: ApiProcess
) -> None:
    await seconds_until_creates_work(
        sentinel_set.kill_master, sentinel_set, broker, "kill -9 of the master"
    )


GENERATIONS = 4
MAX_TOKENS = 240
RATE = 40  # tokens/s: about 6 s per generation, the failover in the middle
#: The one way a generation in flight may end other than ``done``: the failover lost
#: writes (``SENTINEL FAILOVER`` does not wait for the replica it promotes to catch up),
#: and the broker says so, to the writer and to readers that had seen them.
LOSS = "log_lost"


@pytest.mark.e2e
@pytest.mark.parametrize("fault", ["kill_master", "failover"])
async def test_a_failover_mid_generation_ends_nothing_in_error(
    sentinel_set: SentinelSet, broker: ApiProcess, fault: str
) -> None:
    """The master killed mid-generation: the sentinels' failover (down-after 3 s, shipped)
    is an outage of 3-4 s, inside the default 5 s lease. Writers retry, the hub and the
    readers resume, sweepers take nothing over: every generation completes with its text.

    ``SENTINEL FAILOVER``: a second or two, the old master up and refusing writes once its
    replicas are gone. What it took before that is lost when it rejoins as a replica, so a
    generation may end with an explicit ``log_lost`` instead; nothing else, and never an
    ``internal_error``."""
    texts: dict[str, str] = {}
    ends: dict[str, list[str]] = {}  # per stream: "done", or the error's code
    backoff = Backoff(initial=0.1, maximum=0.5, give_up_after=60)
    async with AsyncClient(broker.url, backoff=backoff) as sb:
        ids = []
        for seed in range(GENERATIONS):
            fake = {"tokens_per_second": RATE, "seed": seed}
            created = await sb.create("fake", MESSAGES, max_tokens=MAX_TOKENS, fake=fake)
            ids.append(created.id)
        streaming = {stream_id: anyio.Event() for stream_id in ids}

        async def read(stream_id: str) -> None:
            texts[stream_id], ends[stream_id] = "", []
            try:
                async for event in sb.watch(stream_id):
                    if isinstance(event, Token):
                        texts[stream_id] += event.text
                        if len(texts[stream_id]) > 20:
                            streaming[stream_id].set()
                    elif isinstance(event, Done):
                        ends[stream_id].append("done")
                    elif isinstance(event, StreamFailed):
                        ends[stream_id].append(event.code)
            except APIError as exc:  # a resume past what the store kept: 410
                ends[stream_id].append(exc.code)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as readers:
                for stream_id in ids:
                    readers.start_soon(read, stream_id)
                for started in streaming.values():
                    await started.wait()
                start = time.monotonic()
                old = await anyio.to_thread.run_sync(getattr(sentinel_set, fault))
                await anyio.to_thread.run_sync(sentinel_set.wait_for_new_master, old)
                outage = time.monotonic() - start
        states = [await sb.get(stream_id) for stream_id in ids]

    print(f"\n{fault} under {GENERATIONS} generations: switched in {outage:.2f} s; {ends}")
    for seed, (stream_id, stored) in enumerate(zip(ids, states, strict=True)):
        loss_allowed = fault == "failover"
        assert_ended_as_promised(ends[stream_id], texts[stream_id], stored, seed, loss_allowed)


def assert_ended_as_promised(
    ends: list[str], text: str, stored: dict[str, Any], seed: int, loss_allowed: bool
) -> None:
    """One end, as the reader saw it and as stored: ``done`` with the exact text, or, where
    the failover may lose writes, an explicit loss."""
    assert len(ends) == 1, ends
    if ends == ["done"] or not loss_allowed:
        assert ends == ["done"]
        assert text == expected_text(MAX_TOKENS, seed)
        assert stored["status"] == "completed"
    else:
        assert ends == [LOSS]
        assert stored["status"] == "completed" or stored["error"]["code"] == LOSS, stored


async def test_open_connections_follow_a_new_master_before_sentinel_demotes_the_old(
    sentinel_set: SentinelSet,
) -> None:
    """After ``SENTINEL FAILOVER`` the old master stays a master (and keeps its clients) for
    several seconds, until Sentinel reconfigures it. A pool's connections, used for reads
    only (nothing refused to push them), move to the new master within about a second."""
    client = aioredis.Redis.from_pool(
        store_connections.pool(parse_store_url(sentinel_set.url), client_name="streambroker-t")
    )
    try:
        old = sentinel_set.master_port()
        assert await _port_of(client) == old
        await anyio.to_thread.run_sync(sentinel_set.failover)
        new = await anyio.to_thread.run_sync(sentinel_set.wait_for_new_master, old)
        on_new: Callable[[], Awaitable[bool]] = lambda: _follows(client, new)  # noqa: E731
        await eventually_async(
            on_new, timeout=store_connections.MASTER_CHECK_SECONDS + 3, interval=0.05
        )
        assert sentinel_set.role(old) == "master", "Sentinel demoted it first: proves nothing"
    finally:
        await client.aclose()


async def test_a_connection_in_use_when_the_master_moved_is_re_aimed_when_handed_back(
    sentinel_set: SentinelSet,
) -> None:
    """A connection busy while the pool learnt of the new master (a long read, say) is
    re-made to the new master the next time it is handed out, not a check later."""
    pool = store_connections.pool(parse_store_url(sentinel_set.url), client_name="streambroker-t")
    client = aioredis.Redis.from_pool(pool)
    try:
        old = sentinel_set.master_port()
        held = await pool.get_connection()
        assert held.port == old
        assert await _port_of(client) == old  # a second connection, open to the old master
        await anyio.to_thread.run_sync(sentinel_set.failover)
        new = await anyio.to_thread.run_sync(sentinel_set.wait_for_new_master, old)
        on_new: Callable[[], Awaitable[bool]] = lambda: _follows(client, new)  # noqa: E731
        await eventually_async(
            on_new, timeout=store_connections.MASTER_CHECK_SECONDS + 3, interval=0.01
        )
        await pool.release(held)  # the next one handed out (last in, first out)
        assert await _port_of(client) == new
        assert held.port == new
    finally:
        await client.aclose()


async def _follows(client: aioredis.Redis, port: int) -> bool:
    return await _port_of(client) == port


async def test_a_sentinel_that_keeps_naming_the_old_master_is_asked_last(
    sentinel_set: SentinelSet,
) -> None:
    """Listed first, a Sentinel that never heard of the failover (the minority side of a
    partition) names the old master every time. Once that node refuses writes, the pool
    asks the other Sentinels first, and writes reach the new master."""
    old = sentinel_set.master_port()
    async with stale_sentinel(("127.0.0.1", old)) as stale:
        real = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in sentinel_set.sentinels)
        address = parse_store_url(f"redis+sentinel://127.0.0.1:{stale.port},{real}/streambroker")
        client = aioredis.Redis.from_pool(
            store_connections.bounded_pool(
                address, max_connections=4, wait_seconds=2, client_name="streambroker-t"
            )
        )
        try:
            await client.set("sb:test:k", "before")
            assert await _port_of(client) == old
            await anyio.to_thread.run_sync(sentinel_set.failover)
            new = await anyio.to_thread.run_sync(sentinel_set.wait_for_new_master, old)

            async def written_on_the_new_master() -> bool:
                try:
                    await client.set("sb:test:k", "after")
                except (redis_errors.ConnectionError, redis_errors.ResponseError):
                    return False  # refused by the old master: the next try asks again
                return await _port_of(client) == new

            await eventually_async(written_on_the_new_master, timeout=15, interval=0.1)
            assert stale.asked >= 1
        finally:
            await client.aclose()
