"""Per-tenant event connection limits with real processes: counted across front-ends, other
tenants unaffected, a slot freed when its connection closes, and the slots of a killed
front-end freed by expiry."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from broker import keys
from tests.support.generations import MESSAGES, bearer, create
from tests.support.processes import ApiProcess, Launcher
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]

KEY_A = "key-of-tenant-a-0123456789"
KEY_B = "key-of-tenant-b-0123456789"
ENV = {
    "BROKER_API_KEYS": f"{KEY_A}:tenant-a,{KEY_B}:tenant-b",
    "BROKER_READ_TOKEN_SECRETS": "s" * 32,
    "BROKER_MAX_CONNECTIONS_PER_TENANT": "2",
    "BROKER_CONNECTION_SLOT_SECONDS": "1.5",
}


@pytest.fixture
def apis(launch: Launcher) -> list[ApiProcess]:
    """Two front-ends and a worker, on an emptied store: no slot of another test's."""
    launch.flush()
    apis = [launch.api(ENV), launch.api(ENV)]
    launch.worker(ENV)
    return apis


async def long_stream(client: httpx.AsyncClient, base: str, key: str) -> str:
    return await create(client, base, key=key, max_tokens=2000, rate=20)


@contextlib.asynccontextmanager
async def watching(
    client: httpx.AsyncClient, base: str, stream_id: str, key: str
) -> AsyncIterator[httpx.Response]:
    """An open event connection (its head received), closed on leaving."""
    url = f"{base}/v1/streams/{stream_id}/events"
    async with client.stream("GET", url, headers=bearer(key)) as response:
        if response.status_code != 200:
            await response.aread()
        yield response


async def status_of_one_more(client: httpx.AsyncClient, base: str, stream_id: str, key: str) -> int:
    async with watching(client, base, stream_id, key) as response:
        return response.status_code


async def until_admitted(client: httpx.AsyncClient, base: str, stream_id: str, key: str) -> None:
    """Retry, as a client told 429 would, until the limit lets one more in (bounded)."""

    async def admitted() -> bool:
        return await status_of_one_more(client, base, stream_id, key) != 429

    await eventually_async(admitted, interval=0.1)


async def slot_expiries(redis_url: str, tenant: str) -> tuple[float, list[float]]:
    """Redis's clock and the expiries of ``tenant``'s connection slots (ms, Redis's clock,
    which the slots are reckoned on)."""
    async with aioredis.Redis.from_url(redis_url) as store:
        seconds, microseconds = await store.time()
        slots = await store.zrange(keys.connections_key(tenant), 0, -1, withscores=True)
    return seconds * 1000 + microseconds / 1000, [score for _, score in slots]


async def test_a_tenant_is_limited_across_front_ends_and_others_are_not(
    apis: list[ApiProcess], client: httpx.AsyncClient, redis_server: RedisServer
) -> None:
    first, second = apis
    stream_a = await long_stream(client, first.url, KEY_A)
    stream_b = await long_stream(client, first.url, KEY_B)
    async with (
        watching(client, first.url, stream_a, KEY_A) as one,
        watching(client, second.url, stream_a, KEY_A) as two,
    ):
        assert (one.status_code, two.status_code) == (200, 200)
        async with watching(client, first.url, stream_a, KEY_A) as third:
            assert third.status_code == 429
            error = third.json()["error"]
            assert error["code"] == "too_many_connections"
            assert third.headers["retry-after"] == "1"
        assert await status_of_one_more(client, second.url, stream_b, KEY_B) == 200
        # Open connections keep their slots past the lifetime they were taken with: they are
        # renewed. Waited for on Redis's clock, until the later of the two would have expired.
        _, taken = await slot_expiries(redis_server.url, "tenant-a")
        assert len(taken) == 2, taken

        async def taken_lifetime_over() -> bool:
            now, _ = await slot_expiries(redis_server.url, "tenant-a")
            return now > max(taken)

        await eventually_async(taken_lifetime_over, interval=0.1)
        now, renewed = await slot_expiries(redis_server.url, "tenant-a")
        assert len(renewed) == 2, renewed
        assert min(renewed) > now, (renewed, now)
        assert await status_of_one_more(client, first.url, stream_a, KEY_A) == 429
    # Both closed: their slots are given back at once, not when they expire.
    async with (
        watching(client, second.url, stream_a, KEY_A) as again,
        watching(client, first.url, stream_a, KEY_A) as and_again,
    ):
        assert (again.status_code, and_again.status_code) == (200, 200)


async def test_the_slots_of_a_killed_front_end_come_free(
    apis: list[ApiProcess], client: httpx.AsyncClient
) -> None:
    doomed, survivor = apis
    stream_a = await long_stream(client, survivor.url, KEY_A)
    async with watching(client, doomed.url, stream_a, KEY_A) as held:
        assert held.status_code == 200
        async with watching(client, survivor.url, stream_a, KEY_A) as other:
            assert other.status_code == 200
            assert doomed.process is not None
            doomed.process.kill()  # it can neither give its slot back nor renew it
            assert await status_of_one_more(client, survivor.url, stream_a, KEY_A) == 429
            await until_admitted(client, survivor.url, stream_a, KEY_A)


def completion_body(*, stream: bool) -> dict[str, object]:
    return {
        "model": "fake",
        "messages": MESSAGES,
        "max_tokens": 2000,
        "fake": {"tokens_per_second": 20},
        "stream": stream,
    }


async def stream_ids(client: httpx.AsyncClient, base: str, key: str) -> list[str]:
    response = await client.get(f"{base}/v1/streams", headers=bearer(key))
    assert response.status_code == 200, response.text
    return [row["id"] for row in response.json()["data"]]


async def test_a_chat_completion_refused_by_the_limit_creates_nothing(
    apis: list[ApiProcess], client: httpx.AsyncClient
) -> None:
    """Regression: a streamed chat completion answered 429 by the connection limit still
    created and ran its generation, unseen and uncancellable (and the openai SDK's retries
    made three). Admission, the limit included, now comes before anything is created."""
    first, second = apis
    stream_a = await long_stream(client, first.url, KEY_A)
    before = await stream_ids(client, first.url, KEY_A)
    assert before[0] == stream_a
    async with (
        watching(client, first.url, stream_a, KEY_A) as one,
        watching(client, second.url, stream_a, KEY_A) as two,
    ):
        assert (one.status_code, two.status_code) == (200, 200)
        for stream in (True, False):
            response = await client.post(
                f"{first.url}/v1/chat/completions",
                json=completion_body(stream=stream),
                headers=bearer(KEY_A),
            )
            assert response.status_code == 429, response.text
            assert response.json()["error"]["code"] == "too_many_connections"
    assert await stream_ids(client, first.url, KEY_A) == before


async def test_a_waiting_completion_holds_a_slot_until_its_client_leaves(
    apis: list[ApiProcess], client: httpx.AsyncClient
) -> None:
    """``stream: false`` holds a connection (and a hub subscription) for the whole
    generation: it counts against the limit, and gives its slot back when its client
    leaves, long before the generation ends."""
    first, second = apis
    stream_a = await long_stream(client, first.url, KEY_A)
    before = await stream_ids(client, first.url, KEY_A)
    async with watching(client, first.url, stream_a, KEY_A) as one:
        assert one.status_code == 200
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(60)) as patient,
            anyio.create_task_group() as group,
        ):

            async def wait_for_the_answer() -> None:
                await patient.post(
                    f"{second.url}/v1/chat/completions",
                    json=completion_body(stream=False),
                    headers=bearer(KEY_A),
                )

            group.start_soon(wait_for_the_answer)

            async def created() -> bool:
                return await stream_ids(client, first.url, KEY_A) != before

            await eventually_async(created, interval=0.05)
            # One event connection and the waiting completion: the tenant is at its limit.
            assert await status_of_one_more(client, first.url, stream_a, KEY_A) == 429
            group.cancel_scope.cancel()  # the waiting client hangs up
        # `one` still holds its slot: the waiting completion's came back.
        await until_admitted(client, first.url, stream_a, KEY_A)
