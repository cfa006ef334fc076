"""A generation's stream end to end, from its creation to its end (``done``, ``cancelled``,
a failure's ``error``): read whole, by many clients at once, and resumed on either
front-end; heartbeats and ``retry:``; the state while running; a front-end told to stop,
whose clients resume elsewhere.

Real processes (the ``deployment`` fixture): two api front-ends, an arq worker, redis-server
and a local OpenAI-compatible upstream, all on free ports; clients are real HTTP/SSE
clients."""

from __future__ import annotations

import json
import random
import re
import signal
import time

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from broker.client.sse import SSEDecoder
from tests.support.deployment import Deployment
from tests.support.generations import MESSAGES, assert_well_formed, create, expected_text, state
from tests.support.processes import Launcher
from tests.support.sse import Received, Watch, token_text, watch
from workers.providers.fake import fake_tokens

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


async def test_create_answers_201_with_location_and_urls(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    response = await client.post(
        f"{deployment.urls[0]}/v1/streams",
        json={"model": "fake", "messages": MESSAGES, "max_tokens": 3},
    )
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "queued"
    assert response.headers["location"] == body["url"] == f"/v1/streams/{body['id']}"
    assert body["events_url"] == f"/v1/streams/{body['id']}/events"


async def test_a_generation_streams_its_exact_text_and_state_agrees(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    stream_id = await create(client, deployment.urls[0], max_tokens=60)
    seen = await watch(client, deployment.urls[0], stream_id)
    assert seen.status == 200
    assert_well_formed(seen.events)
    assert seen.events[0].type == "metadata"
    assert seen.events[0].data["model"] == "fake"
    assert token_text(seen.events) == expected_text(60)
    done = seen.events[-1]
    assert done.type == "done"
    assert done.data["finish_reason"] == "stop"
    assert done.data["usage"]["completion_tokens"] == 60
    final = await state(client, deployment.urls[1], stream_id)
    assert final["status"] == "completed"
    assert final["text"] == expected_text(60)
    assert final["last_event_id"] == done.id
    assert any(e.type == "progress" for e in seen.events)


async def test_many_clients_on_both_front_ends_see_identical_text(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    stream_id = await create(client, deployment.urls[0], max_tokens=150, rate=300)
    results: list[Watch] = []

    async def one(i: int) -> None:
        results.append(await watch(client, deployment.urls[i % 2], stream_id))

    async with anyio.create_task_group() as group:
        for i in range(24):
            group.start_soon(one, i)
    final = await state(client, deployment.urls[0], stream_id)
    assert len(results) == 24
    for result in results:
        assert_well_formed(result.events)
        assert token_text(result.events) == final["text"] == expected_text(150)
        assert [e.id for e in result.events] == [e.id for e in results[0].events]


async def test_clients_that_hang_up_and_resume_get_exactly_the_final_text(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    stream_id = await create(client, deployment.urls[0], max_tokens=200, rate=250)
    rng = random.Random(7)
    sessions: list[list[Received]] = []

    async def reconnecting_client(n: int) -> None:
        received: list[Received] = []
        last: int | None = None
        connections = 0
        while not received or received[-1].type not in ("done", "error"):
            connections += 1
            assert connections < 500, "client never reached the terminal event"
            via = "header" if (n + connections) % 2 else "query"
            part = await watch(
                client,
                deployment.urls[connections % 2],
                stream_id,
                after=last,
                via=via,
                stop_after=rng.randint(1, 6),
            )
            assert part.status == 200
            received.extend(part.events)
            last = received[-1].id if received else None
        sessions.append(received)

    async with anyio.create_task_group() as group:
        for n in range(10):
            group.start_soon(reconnecting_client, n)
    final = await state(client, deployment.urls[1], stream_id)
    assert final["text"] == expected_text(200)
    for received in sessions:
        assert_well_formed(received)
        assert token_text(received) == final["text"]


async def test_resume_on_the_other_front_end_continues_after_the_given_id(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    stream_id = await create(client, deployment.urls[0], max_tokens=80)
    first = await watch(client, deployment.urls[0], stream_id, stop_after=5)
    rest = await watch(client, deployment.urls[1], stream_id, after=first.events[-1].id)
    assert rest.events[0].id == first.events[-1].id + 1
    everything = first.events + rest.events
    assert_well_formed(everything)
    assert [e.id for e in everything] == list(range(1, len(everything) + 1))
    assert token_text(everything) == expected_text(80)


async def test_resume_at_the_terminal_event_answers_204_and_beyond_it_410(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    """Beyond the terminal event is an id the log never had (after a failover, one the
    readers got from a master that is gone): never a 204 that says "you have it all"."""
    stream_id = await create(client, deployment.urls[0], max_tokens=10)
    whole = await watch(client, deployment.urls[0], stream_id)
    last = whole.events[-1].id
    for after, via in ((last, "header"), (last, "query")):
        again = await watch(client, deployment.urls[1], stream_id, after=after, via=via)  # type: ignore[arg-type]
        assert again.status == 204
        assert again.events == []
    beyond = await client.get(
        f"{deployment.urls[1]}/v1/streams/{stream_id}/events",
        headers={"Last-Event-ID": str(last + 100)},
    )
    assert beyond.status_code == 410
    assert beyond.json()["error"]["code"] == "log_lost"
    tail = await watch(client, deployment.urls[1], stream_id, after=last - 1)
    assert [(e.id, e.type) for e in tail.events] == [(last, "done")]


async def test_a_stream_sends_retry_first_and_pings_while_quiet(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    # Two tokens a second, a 0.3 s heartbeat: pings must appear between the tokens.
    stream_id = await create(client, deployment.urls[0], max_tokens=3, rate=2)
    url = f"{deployment.urls[1]}/v1/streams/{stream_id}/events"
    async with client.stream("GET", url) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"].startswith("no-cache")
        assert response.headers["x-accel-buffering"] == "no"
        body = ""
        async for chunk in response.aiter_text():
            body += chunk
    # `retry:` is a line of the first event (pings may come before it while queued); the
    # pings are comment lines between events, never blocks of their own.
    assert re.sub(r"^(: ping\n)*", "", body).startswith("retry: 2000\nevent: metadata\n")
    assert body.count("retry:") == 1
    assert "\n: ping\n" in body
    assert ": ping\n\n" not in body
    decoder = SSEDecoder()
    events = decoder.feed(body.encode())
    assert decoder.retry_ms == 2000
    assert events[0].event == "metadata"
    assert [e.event for e in events].count("token") == 3
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    assert events[-1].event == "done"
    assert body.endswith(f"\nid: {len(events)}\n\n")  # ends after the terminal event


async def test_state_shows_the_text_so_far_while_running(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    stream_id = await create(client, deployment.urls[0], max_tokens=40, rate=40)
    await watch(client, deployment.urls[0], stream_id, stop_after=3)  # a token has been appended
    running = await state(client, deployment.urls[1], stream_id)
    assert running["status"] == "running"
    assert running["text"]
    assert expected_text(40).startswith(running["text"])
    assert running["finished_at"] is None


async def test_cancel_ends_the_stream_with_cancelled_within_about_a_second(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    stream_id = await create(client, deployment.urls[0], max_tokens=5000, rate=50)
    await watch(client, deployment.urls[0], stream_id, stop_after=2)
    asked = time.monotonic()
    response = await client.post(f"{deployment.urls[1]}/v1/streams/{stream_id}/cancel")
    assert response.status_code == 202
    rest = await watch(client, deployment.urls[0], stream_id, after=1)
    took = time.monotonic() - asked
    assert rest.events[-1].type == "done"
    assert rest.events[-1].data["finish_reason"] == "cancelled"
    assert took < 3.0, f"cancel took {took:.2f}s"  # a bound for hangs, not a benchmark
    final = await state(client, deployment.urls[0], stream_id)
    assert final["status"] == "cancelled"
    assert final["text"] == token_text(rest.events)
    again = await client.post(f"{deployment.urls[0]}/v1/streams/{stream_id}/cancel")
    assert again.status_code == 200
    assert again.json()["status"] == "cancelled"


async def test_injected_provider_failure_ends_with_error_and_failed_status(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    stream_id = await create(client, deployment.urls[0], max_tokens=50, fail_after_tokens=7)
    seen = await watch(client, deployment.urls[1], stream_id)
    assert_well_formed(seen.events)
    error = seen.events[-1]
    assert error.type == "error"
    assert error.data["code"] == "fake_failure"
    assert error.data["retryable"] is False
    assert token_text(seen.events) == expected_text(50)[: len(token_text(seen.events))]
    assert token_text(seen.events) == "".join(fake_tokens(MESSAGES, 50, 0)[:7])
    final = await state(client, deployment.urls[0], stream_id)
    assert final["status"] == "failed"
    assert final["error"]["code"] == "fake_failure"


async def test_a_front_end_told_to_stop_ends_its_streams_cleanly_and_clients_resume_elsewhere(
    deployment: Deployment, client: httpx.AsyncClient, launch: Launcher
) -> None:
    """SIGTERM (a rolling deploy): open event streams end as complete responses at once,
    not cut after the grace period, and the clients lose nothing by resuming elsewhere."""
    leaving = launch.api({"BROKER_HEARTBEAT_SECONDS": "0.3"})
    stream_id = await create(client, leaving.url, max_tokens=120, rate=40)
    received: list[Received] = []
    url = f"{leaving.url}/v1/streams/{stream_id}/events"
    with anyio.fail_after(15):
        async with aconnect_sse(client, "GET", url) as source:
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue
                received.append(Received(int(sse.id), sse.event, json.loads(sse.data)))
                if len(received) == 3:
                    assert leaving.process is not None
                    leaving.process.send_signal(signal.SIGTERM)
        # The loop ended without httpx raising: the response was complete, not cut.
    assert received[-1].type not in ("done", "error")
    assert leaving.process is not None
    # uvicorn re-raises SIGTERM once its shutdown is complete: "terminated", cleanly.
    assert leaving.process.wait(10) == -signal.SIGTERM
    rest = await watch(client, deployment.urls[0], stream_id, after=received[-1].id)
    everything = received + rest.events
    assert_well_formed(everything)
    assert token_text(everything) == expected_text(120)
