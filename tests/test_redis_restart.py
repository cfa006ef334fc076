"""Redis killed (SIGKILL) and restarted on its data, with the shipped configuration
(``infra/redis.conf``: AOF, fsync every second), under a real api and worker.

While Redis is down: ``/readyz`` and requests answer 503 in the error shape. After: ready
again within seconds, the worker still running (no crash), finished streams intact, the
in-flight stream ended with exactly one terminal event (it continued, or ended explicitly),
and a reader that resumes either continues consistently or is told ``log_lost``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from tests.support.generations import assert_well_formed, create, expected_text, state
from tests.support.processes import ROOT, Launcher
from tests.support.redis_server import RedisServer, running_server
from tests.support.sse import Watch, token_text, watch
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]

CONFIG = ROOT / "infra" / "redis.conf"


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    with running_server(config=CONFIG) as server:
        yield server


async def until_ready_is(client: httpx.AsyncClient, base: str, status: int) -> float:
    """Seconds until ``/readyz`` answers ``status`` (polled, bounded)."""
    start = time.monotonic()

    async def answers() -> bool:
        return (await client.get(f"{base}/readyz")).status_code == status

    await eventually_async(answers, timeout=30, interval=0.05)
    return time.monotonic() - start


async def test_redis_killed_and_restarted(
    durable_redis: RedisServer, launch: Launcher, client: httpx.AsyncClient
) -> None:
    env = {"BROKER_HEARTBEAT_SECONDS": "0.3"}
    api = launch.api(env, redis_url=durable_redis.url)
    worker = launch.worker(env, redis_url=durable_redis.url)

    finished_id = await create(client, api.url, max_tokens=30, rate=1000, seed=5)
    finished = await watch(client, api.url, finished_id)
    assert finished.ended
    inflight_id = await create(client, api.url, max_tokens=300, rate=40, seed=6)
    seen = await watch(client, api.url, inflight_id, stop_after=8)

    durable_redis.kill()
    await assert_unavailable_while_down(client, api.url)

    durable_redis.start()
    ready_after = await until_ready_is(client, api.url, 200)
    print(f"\nRedis restarted -> /readyz 200 after {ready_after:.2f}s")  # for the note
    assert worker.process is not None
    assert worker.process.poll() is None, worker.output()  # no crash

    # Finished before the crash: exactly as it was.
    again = await watch(client, api.url, finished_id)
    assert again.events == finished.events
    assert (await state(client, api.url, finished_id))["text"] == expected_text(30, seed=5)

    await assert_in_flight_ended_consistently(client, api.url, inflight_id, seen)
    await assert_serves_new_work(client, api.url)


async def assert_unavailable_while_down(client: httpx.AsyncClient, base: str) -> None:
    """Redis down: ``/readyz`` turns 503, and so does a create, in the error shape."""
    await until_ready_is(client, base, 503)
    during = await client.post(
        f"{base}/v1/streams",
        json={"model": "fake", "messages": [{"role": "user", "content": "x"}]},
    )
    assert during.status_code == 503
    assert during.json()["error"]["code"] == "store_unavailable"


async def assert_in_flight_ended_consistently(
    client: httpx.AsyncClient, base: str, stream_id: str, seen: Watch
) -> None:
    """The stream in flight at the crash ends, with one terminal event, whatever the crash
    took; the reader that was cut off (``seen``) resumes from its last id: a consistent
    continuation, or an explicit ``log_lost`` when the crash took events it had received."""
    with anyio.fail_after(40):
        whole = await watch(client, base, stream_id)
    assert_well_formed(whole.events)
    final = await state(client, base, stream_id)
    assert final["status"] in ("completed", "failed")
    if final["status"] == "completed":
        assert token_text(whole.events) == expected_text(300, seed=6)
    else:
        assert whole.events[-1].data["code"] in ("log_lost", "worker_lost", "internal_error")
    after = seen.events[-1].id
    resumed = await client.get(
        f"{base}/v1/streams/{stream_id}/events", headers={"Last-Event-ID": str(after)}
    )
    if resumed.status_code == 410:
        assert resumed.json()["error"]["code"] == "log_lost"
        assert final["lost_after_event_id"] is not None
        assert final["lost_after_event_id"] < after
    else:
        assert resumed.status_code in (200, 204)
        assert [e for e in whole.events if e.id <= after] == seen.events


async def assert_serves_new_work(client: httpx.AsyncClient, base: str) -> None:
    """After the restart the broker generates new streams to their end."""
    fresh = await create(client, base, max_tokens=20, rate=1000, seed=7)
    with anyio.fail_after(30):
        done = await watch(client, base, fresh)
    assert token_text(done.events) == expected_text(20, seed=7)
