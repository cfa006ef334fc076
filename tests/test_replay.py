"""Timed replay (``?replay=<speed>``) with a real api process and worker: the recorded pacing
scaled by the speed (measured, within a tolerance), from a resume point, following live once
caught up; bad speeds refused."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import httpx
import pytest

from tests.support.generations import assert_well_formed, create, expected_text
from tests.support.processes import (
    ApiProcess,
    api_and_worker,
)
from tests.support.redis_server import RedisServer
from tests.support.sse import decode_sse, token_text, watch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    with api_and_worker(redis_server.url, {"BROKER_HEARTBEAT_SECONDS": "0.2"}) as api:
        yield api


async def recorded(client: httpx.AsyncClient, api: ApiProcess, seed: int) -> tuple[str, float]:
    """A finished generation (40 tokens at 40/s, about a second) and its recorded span (s)."""
    stream_id = await create(client, api.url, max_tokens=40, rate=40, seed=seed)
    with anyio.fail_after(30):
        seen = await watch(client, api.url, stream_id)
    assert seen.ended
    return stream_id, (seen.events[-1].data["t"] - seen.events[0].data["t"]) / 1000


async def timed_replay(
    client: httpx.AsyncClient, api: ApiProcess, stream_id: str, speed: float, after: int = 0
) -> tuple[float, list[str]]:
    url = f"{api.url}/v1/streams/{stream_id}/events"
    params = {"replay": str(speed)}
    headers = {"Last-Event-ID": str(after)} if after else {}
    start = time.monotonic()
    async with client.stream("GET", url, params=params, headers=headers) as response:
        assert response.status_code == 200
        body = (await response.aread()).decode()
    return time.monotonic() - start, body.split("\n\n")


async def test_replay_keeps_the_recorded_pacing_scaled_by_the_speed(
    api: ApiProcess, client: httpx.AsyncClient
) -> None:
    stream_id, span = await recorded(client, api, seed=1)
    assert span > 0.5  # the fake model spread the answer over about a second
    slow, blocks = await timed_replay(client, api, stream_id, speed=1)
    fast, _ = await timed_replay(client, api, stream_id, speed=10)
    # As recorded at 1x (a little scheduling slack), ten times faster at 10x.
    assert span * 0.9 <= slow <= span + 0.5, (span, slow)
    assert fast <= span / 10 + 0.3, (span, fast)
    assert slow / fast > 3
    # Without replay, recorded events come as fast as the client reads.
    start = time.monotonic()
    plain = await watch(client, api.url, stream_id)
    assert time.monotonic() - start < span / 2
    replayed = [int(f.id or 0) for f in decode_sse("\n\n".join(blocks))]
    assert replayed == [e.id for e in plain.events]  # the same events either way


async def test_replay_from_a_resume_point_sends_only_what_follows(
    api: ApiProcess, client: httpx.AsyncClient
) -> None:
    stream_id, _ = await recorded(client, api, seed=2)
    whole = await watch(client, api.url, stream_id)
    middle = whole.events[len(whole.events) // 2].id
    _, blocks = await timed_replay(client, api, stream_id, speed=20, after=middle)
    ids = [int(f.id or 0) for f in decode_sse("\n\n".join(blocks))]
    assert ids == [e.id for e in whole.events if e.id > middle]


async def test_replay_of_a_live_stream_follows_it_once_caught_up(
    api: ApiProcess, client: httpx.AsyncClient
) -> None:
    stream_id = await create(client, api.url, max_tokens=60, rate=30, seed=3)
    url = f"{api.url}/v1/streams/{stream_id}/events"
    async with client.stream("GET", url, params={"replay": "50"}) as response:
        body = (await response.aread()).decode()
    events = decode_sse(body)
    assert events[-1].event == "done"
    seen = await watch(client, api.url, stream_id)
    assert_well_formed(seen.events)
    assert token_text(seen.events) == expected_text(60, seed=3)
    assert len(events) == len(seen.events)


@pytest.mark.parametrize(
    "speed",
    [
        *("0", "-1", "abc", "nan", "inf", "1e9", "0.001", ""),
        # float() reads these, but a speed is ASCII digits with at most one '.' between them
        # (broker.numbers); \u0661 is ARABIC-INDIC DIGIT ONE, \uff12 FULLWIDTH DIGIT TWO.
        *("\u0661", "\uff12", "+1", " 1", "1_0", "1e2", "5."),
    ],
)
async def test_bad_speeds_are_refused_with_a_named_error(
    api: ApiProcess, client: httpx.AsyncClient, speed: str
) -> None:
    stream_id = await create(client, api.url, max_tokens=2, rate=1000)
    response = await client.get(
        f"{api.url}/v1/streams/{stream_id}/events", params={"replay": speed}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith("replay:")
