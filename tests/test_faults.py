"""Faults with real processes: a worker killed or stalled mid-generation, a front-end killed
mid-stream. Every generation still ends with one terminal event, a stalled writer is fenced,
and clients resume elsewhere with nothing lost or repeated.

Each test starts its own api(s) and worker on free ports, against the session's redis-server,
because it kills them.
"""

from __future__ import annotations

import json
import os
import signal
import time

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.support.generations import assert_well_formed, create, expected_text, state
from tests.support.processes import Launcher
from tests.support.sse import Received, token_text, watch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]

#: The issue's bound for a killed worker's stream to end (lease 5 s + sweep 1 s, defaults).
WORKER_LOST_DEADLINE = 15.0
#: The fake's route does not continue here: these tests are of the end a generation gets
#: when it may not be continued (its continuation: test_continuation_e2e).
NO_CONTINUATION = {"BROKER_ROUTES": "fake=fake:off,*=openai"}


async def read_some_then(
    client: httpx.AsyncClient, base: str, stream_id: str, tokens: int, then: object
) -> tuple[list[Received], float]:
    """Read until ``tokens`` token events came, call ``then()``, read on to the terminal
    event; returns the events and the seconds from ``then()`` to the terminal event."""
    events: list[Received] = []
    acted_at = 0.0
    url = f"{base}/v1/streams/{stream_id}/events"
    async with aconnect_sse(client, "GET", url) as source:
        async for sse in source.aiter_sse():
            if not sse.data:
                continue
            events.append(Received(int(sse.id), sse.event, json.loads(sse.data)))
            if not acted_at and sum(e.type == "token" for e in events) >= tokens:
                assert callable(then)
                then()
                acted_at = time.monotonic()
            if events[-1].type in ("done", "error"):
                break
    return events, time.monotonic() - acted_at


async def test_a_killed_workers_stream_ends_with_a_retryable_error_within_seconds(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    api = launch.api(NO_CONTINUATION)
    worker = launch.worker(NO_CONTINUATION)
    stream_id = await create(client, api.url, max_tokens=400, rate=20)

    assert worker.process is not None
    kill = lambda: os.kill(worker.process.pid, signal.SIGKILL)  # noqa: E731
    with anyio.fail_after(WORKER_LOST_DEADLINE + 10):
        events, ended_after = await read_some_then(client, api.url, stream_id, 3, kill)

    assert_well_formed(events)
    last = events[-1]
    assert last.type == "error"
    assert last.data["code"] == "worker_lost"
    assert last.data["retryable"] is True
    assert ended_after < WORKER_LOST_DEADLINE, f"ended {ended_after:.1f}s after the kill"
    print(f"\nworker SIGKILL -> terminal event: {ended_after:.2f}s")  # the figure for the note
    final = await state(client, api.url, stream_id)
    assert final["status"] == "failed"
    assert final["text"] == token_text(events)  # what readers saw is what is recorded
    # A resume after the end answers 204: the stream is over for every client.
    again = await watch(client, api.url, stream_id, after=last.id)
    assert again.status == 204


async def test_a_stalled_worker_is_fenced_and_stops_when_it_wakes(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    """SIGSTOP past the lease: the stream is ended by a sweeper; after SIGCONT the old writer
    cannot append anything, notices, and the worker carries on with new work."""
    env = {"BROKER_LEASE_SECONDS": "1", "BROKER_SWEEP_SECONDS": "0.1", **NO_CONTINUATION}
    api = launch.api(env)
    worker = launch.worker(env)
    stream_id = await create(client, api.url, max_tokens=400, rate=20)

    assert worker.process is not None
    stop = lambda: os.kill(worker.process.pid, signal.SIGSTOP)  # noqa: E731
    try:
        with anyio.fail_after(30):
            events, _ = await read_some_then(client, api.url, stream_id, 3, stop)
        assert events[-1].type == "error"
        assert events[-1].data["code"] == "worker_lost"
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)

    await anyio.to_thread.run_sync(worker.wait_for_output, f"generation {stream_id}: stopped")
    everything = await watch(client, api.url, stream_id)
    assert everything.events == events  # the woken writer added nothing, anywhere
    assert_well_formed(everything.events)
    # The worker is healthy: the next generation runs to its end.
    next_id = await create(client, api.url, max_tokens=20, rate=1000, seed=3)
    with anyio.fail_after(30):
        after = await watch(client, api.url, next_id)
    assert token_text(after.events) == expected_text(20, seed=3)


async def test_clients_of_a_killed_front_end_resume_on_another_with_nothing_lost(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    doomed, survivor = launch.api(), launch.api()
    launch.worker()
    stream_ids = [await create(client, doomed.url, max_tokens=120, rate=60, seed=s) for s in (1, 2)]

    midway = anyio.Event()  # the first stream has shown some text

    async def follow(stream_id: str, received: list[Received]) -> None:
        """Read from the doomed front-end; when it dies, resume on the survivor."""
        try:
            async with aconnect_sse(
                client, "GET", f"{doomed.url}/v1/streams/{stream_id}/events"
            ) as source:
                async for sse in source.aiter_sse():
                    if sse.data:
                        received.append(Received(int(sse.id), sse.event, json.loads(sse.data)))
                    if sum(e.type == "token" for e in received) >= 5:
                        midway.set()
        except httpx.HTTPError:
            pass  # the front-end died under us
        if received and received[-1].type in ("done", "error"):
            return
        rest = await watch(client, survivor.url, stream_id, after=received[-1].id)
        received.extend(rest.events)

    received: dict[str, list[Received]] = {s: [] for s in stream_ids}
    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            for stream_id in stream_ids:
                group.start_soon(follow, stream_id, received[stream_id])
            await midway.wait()
            assert doomed.process is not None
            doomed.process.kill()

    for seed, stream_id in zip((1, 2), stream_ids, strict=True):
        events = received[stream_id]
        assert_well_formed(events)
        assert events[-1].type == "done"
        assert token_text(events) == expected_text(120, seed=seed)
