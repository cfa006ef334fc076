"""The Python client against real processes: an api, a worker and redis-server, with a TCP
proxy between client and api that cuts connections at random byte counts, and one that
stalls them (open, silent). Whatever the network does, a watch ends with the exact text."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from broker.client import (
    APIError,
    AsyncClient,
    Backoff,
    Client,
    ClientError,
    Done,
    Metadata,
    Progress,
    StreamEvent,
    Token,
)
from tests.support.chaos_proxy import ChaosProxy
from tests.support.generations import MESSAGES, expected_text
from tests.support.processes import (
    ApiProcess,
    api_and_worker,
)
from tests.support.redis_server import RedisServer
from tests.support.sse import decode_sse

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]

FAST_RETRY = Backoff(initial=0.01, maximum=0.05, give_up_after=30)


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    env = {"BROKER_HEARTBEAT_SECONDS": "0.2", "BROKER_RETRY_MS": "20"}
    with api_and_worker(redis_server.url, env) as api:
        yield api


def text_of(events: list[StreamEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, Token))


async def test_create_and_watch_yield_typed_events_and_statistics(api: ApiProcess) -> None:
    async with AsyncClient(api.url) as sb:
        stream = await sb.create(
            "fake", MESSAGES, max_tokens=30, metadata={"who": "test"}, fake={"seed": 3}
        )
        watch = sb.watch(stream.id)
        events = [event async for event in watch]
        state = await sb.get(stream.id)
    assert isinstance(events[0], Metadata)
    assert events[0].model == "fake"
    assert isinstance(events[-1], Done)
    assert events[-1].finish_reason == "stop"
    assert any(isinstance(event, Progress) for event in events)
    assert text_of(events) == expected_text(30, seed=3) == state["text"]
    assert [event.id for event in events] == sorted({event.id for event in events})
    stats = watch.stats
    assert (stats.connects, stats.reconnects, stats.events) == (1, 0, len(events))
    assert stats.last_event_id == state["last_event_id"]
    assert stats.time_to_first_token is not None
    assert stats.bytes_received > 500
    assert state["metadata"] == {"who": "test"}


@pytest.mark.parametrize("seed", range(4))
async def test_watch_through_a_proxy_that_cuts_connections_ends_with_the_exact_text(
    api: ApiProcess, seed: int
) -> None:
    async with AsyncClient(api.url) as direct:
        stream = await direct.create(
            "fake", MESSAGES, max_tokens=60, fake={"seed": seed, "tokens_per_second": 300}
        )
        async with (
            ChaosProxy(api.port, cut_after=(1, 700), seed=seed) as proxy,
            AsyncClient(f"http://127.0.0.1:{proxy.port}", backoff=FAST_RETRY) as sb,
        ):
            watch = sb.watch(stream.id)
            events = [event async for event in watch]
        final = await direct.get(stream.id)
    assert text_of(events) == expected_text(60, seed=seed) == final["text"]
    assert isinstance(events[-1], Done)
    ids = [event.id for event in events]
    assert ids == sorted(set(ids))  # nothing twice, in order
    assert proxy.cuts >= 2
    assert watch.stats.reconnects >= proxy.cuts - 1


async def test_watch_through_a_proxy_that_stalls_times_out_and_resumes(api: ApiProcess) -> None:
    async with AsyncClient(api.url) as direct:
        stream = await direct.create(
            "fake", MESSAGES, max_tokens=40, fake={"seed": 9, "tokens_per_second": 80}
        )
        async with (
            ChaosProxy(api.port, cut_after=(300, 900), seed=9, stall=True) as proxy,
            # The server announces a 0.2 s heartbeat: silence past 1.4 s is a dead connection.
            AsyncClient(f"http://127.0.0.1:{proxy.port}", backoff=FAST_RETRY) as sb,
        ):
            watch = sb.watch(stream.id)
            events = [event async for event in watch]
    assert text_of(events) == expected_text(40, seed=9)
    assert watch.stats.heartbeat_timeouts >= 1
    assert watch.stats.heartbeat_timeouts == watch.stats.reconnects


async def test_watch_from_a_resume_point_and_after_the_end(api: ApiProcess) -> None:
    async with AsyncClient(api.url) as sb:
        stream = await sb.create("fake", MESSAGES, max_tokens=10, fake={"seed": 1})
        whole = [event async for event in sb.watch(stream.id)]
        middle = whole[len(whole) // 2].id
        rest = [event async for event in sb.watch(stream.id, last_event_id=middle)]
        assert [event.id for event in rest] == [event.id for event in whole if event.id > middle]
        # Resuming at the terminal event: 204, the watch ends at once with nothing.
        assert [event async for event in sb.watch(stream.id, last_event_id=whole[-1].id)] == []
        with pytest.raises(APIError) as caught:
            await anext(sb.watch("01m7z9j8wh4r9fx1nwy0tg1dcq"))
    assert (caught.value.status, caught.value.code) == (404, "stream_not_found")


def test_the_sync_client_does_the_same(api: ApiProcess) -> None:
    with Client(api.url) as sb:
        stream = sb.create("fake", MESSAGES, max_tokens=12, fake={"seed": 5})
        watch = sb.watch(stream.id)
        events = list(watch)
        page = sb.list_streams(limit=200)
        archive = b"".join(sb.export(stream.id))
        cancelled = sb.cancel(stream.id)
    assert text_of(events) == expected_text(12, seed=5)
    assert watch.stats.events == len(events)
    assert stream.id in [row["id"] for row in page.data]
    assert archive.count(b"\n") == len(events) + 1  # the header, then one line per event
    assert cancelled["status"] == "completed"  # it had ended: cancel answers the state


def test_the_sync_client_refuses_to_run_inside_an_event_loop(api: ApiProcess) -> None:
    async def inside() -> None:
        with Client(api.url) as sb:
            sb.get("x")

    with pytest.raises(ClientError, match="use AsyncClient"):
        asyncio.run(inside())


async def test_heartbeats_can_come_as_events_for_browsers(api: ApiProcess) -> None:
    async with AsyncClient(api.url) as sb:
        stream = await sb.create(
            "fake", MESSAGES, max_tokens=4, fake={"seed": 11, "tokens_per_second": 4}
        )  # about a second: several 0.2 s heartbeats
        http = sb._http
        url = f"/v1/streams/{stream.id}/events"
        body = (await http.get(url, params={"heartbeat": "event"})).text
        plain = (await http.get(url, params={"last_event_id": "1"})).text
        refused = await http.get(url, params={"heartbeat": "loud"})
    assert "event: heartbeat\ndata: {}\n\n" in body
    assert body.count(": ping") == 1  # only the opening line; every heartbeat is an event
    assert body.startswith(": ping\n")
    events = [(f.id, f.event) for f in decode_sse(body) if f.event != "heartbeat"]
    assert events[0] == ("1", "metadata")  # the events themselves are unchanged
    assert "event: heartbeat" not in plain  # the default stays the comment
    assert refused.status_code == 400
    assert refused.json()["error"]["message"].startswith("heartbeat:")
