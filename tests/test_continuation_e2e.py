"""Answers that survive their worker, with real processes: a worker killed (SIGKILL), stalled
past its lease (SIGSTOP) or stopped for a deploy (SIGTERM) mid-answer, and the same stream
continued by another worker. Readers, cutting and resuming across two api processes, end
with exactly the text of an uninterrupted run, one ``resumed`` event and one terminal event;
the old writer adds nothing; cancel wins over a pending continuation; the limit ends it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from broker import keys
from tests.support.generations import MESSAGES, assert_well_formed, create, expected_text, state
from tests.support.openai_answers import echo_text
from tests.support.openai_server import PACED_MODEL, OpenAIServer, continuation_of
from tests.support.processes import BrokerProcess, Launcher
from tests.support.sse import Received, token_text, watch
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]

#: A short lease, so a lost worker is noticed in about a second.
FAST_LEASE = {"BROKER_LEASE_SECONDS": "1", "BROKER_SWEEP_SECONDS": "0.2"}
DEADLINE = 60.0


@pytest.fixture
async def store(launch: Launcher) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.from_url(launch.redis_url)
    yield redis
    await redis.aclose()


async def writer_pid(store: aioredis.Redis, stream_id: str) -> int:
    """The pid of the worker holding the generation now (its worker id is host:pid:token),
    once one holds it and has written a token."""

    async def holder() -> int | None:
        worker, last_seq = await store.hmget(keys.meta_key(stream_id), ["worker", "last_seq"])
        parts = (worker or b"").decode().split(":")
        return int(parts[1]) if len(parts) == 3 and int(last_seq or 0) >= 3 else None

    pid: int = await eventually_async(holder, timeout=DEADLINE, what="a worker writing it")
    return pid


async def field_reaches(
    client: httpx.AsyncClient, api: str, stream_id: str, name: str, least: int = 1
) -> None:
    """Wait until the state's ``name`` is at least ``least`` (a number) or set (else)."""

    async def reached() -> bool:
        value = (await state(client, api, stream_id))[name]
        return value is not None and (not isinstance(value, int) or value >= least)

    await eventually_async(reached, timeout=DEADLINE, what=f"{name} of {stream_id}")


async def read_cutting(
    client: httpx.AsyncClient, apis: list[str], stream_id: str, *, every: int
) -> list[Received]:
    """A reader that hangs up after every ``every`` events and resumes with the last id it
    holds, on the other api each time, until the terminal event."""
    received: list[Received] = []
    turn = 0
    while not received or received[-1].type not in ("done", "error"):
        after = received[-1].id if received else None
        part = await watch(client, apis[turn % len(apis)], stream_id, after=after, stop_after=every)
        assert part.status == 200, part.status
        received += part.events
        turn += 1
    return received


def seams(events: list[Received]) -> list[int]:
    """For each ``resumed`` event: ms from the last event before it to the first token after."""
    gaps = []
    for i, event in enumerate(events):
        if event.type == "resumed":
            before = events[i - 1].data["t"]
            after = next(e for e in events[i:] if e.type == "token").data["t"]
            gaps.append(after - before)
    return gaps


def assert_one_continued_answer(events: list[Received], text: str, *, resumed: int = 1) -> None:
    assert_well_formed(events)
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert token_text(events) == text
    assert events[-1].type == "done"
    assert sum(e.type == "resumed" for e in events) == resumed


async def test_a_killed_workers_answer_is_continued_exactly_for_every_reader(
    launch: Launcher, client: httpx.AsyncClient, store: aioredis.Redis
) -> None:
    apis = [launch.api(FAST_LEASE).url, launch.api(FAST_LEASE).url]
    for _ in range(2):
        launch.worker(FAST_LEASE)
    stream_id = await create(client, apis[0], max_tokens=200, rate=100, seed=11)

    async def kill_its_worker() -> None:
        os.kill(await writer_pid(store, stream_id), signal.SIGKILL)

    with anyio.fail_after(DEADLINE):
        readers = [read_cutting(client, apis, stream_id, every=n) for n in (3, 5, 8, 13)]
        *everyone, _ = await asyncio.gather(*readers, kill_its_worker())

    for events in everyone:
        assert_one_continued_answer(events, expected_text(200, seed=11))
        (seam,) = [e for e in events if e.type == "resumed"]
        assert seam.data["reason"] == "worker_lost"
        assert seam.data["after_event_id"] == seam.id - 1
    assert everyone[0] == everyone[1] == everyone[2] == everyone[3]
    final = await state(client, apis[1], stream_id)
    assert (final["status"], final["continuations"], final["handover"]) == ("completed", 1, None)
    assert final["text"] == expected_text(200, seed=11)
    assert final["usage"]["completion_tokens"] == 200


async def test_a_stalled_writer_is_continued_and_adds_nothing_when_it_wakes(
    launch: Launcher, client: httpx.AsyncClient, store: aioredis.Redis
) -> None:
    api = launch.api(FAST_LEASE).url
    workers = [launch.worker(FAST_LEASE), launch.worker(FAST_LEASE)]
    stream_id = await create(client, api, max_tokens=150, rate=50, seed=5)
    pid = await writer_pid(store, stream_id)
    (stalled,) = [w for w in workers if w.process is not None and w.process.pid == pid]
    os.kill(pid, signal.SIGSTOP)
    try:
        with anyio.fail_after(DEADLINE):
            first = await watch(client, api, stream_id)
    finally:
        os.kill(pid, signal.SIGCONT)

    assert_one_continued_answer(first.events, expected_text(150, seed=5))
    # The woken writer finds itself fenced and stops; the log is what readers already had.
    await anyio.to_thread.run_sync(stalled.wait_for_output, f"generation {stream_id}: stopped")
    again = await watch(client, api, stream_id)
    assert again.events == first.events


async def test_a_rolling_deploy_continues_every_answer_exactly(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    """20 generations streaming; each worker in turn gets SIGTERM and a new one takes its
    place. All 20 complete with exact text, and each seam costs well under a second."""
    api = launch.api().url
    workers = [launch.worker(), launch.worker()]
    ids = [await create(client, api, max_tokens=300, rate=40, seed=100 + i) for i in range(20)]
    readers = [asyncio.create_task(watch(client, api, stream_id)) for stream_id in ids]
    with anyio.fail_after(DEADLINE):
        for stream_id in ids:  # every one is running and has written tokens
            await field_reaches(client, api, stream_id, "last_event_id", 3)
        for i in range(len(workers)):
            await anyio.to_thread.run_sync(deploy, workers[i])
            workers[i] = launch.worker()
        results = await asyncio.gather(*readers)

    gaps: list[int] = []
    for i, result in enumerate(results):
        events = result.events
        assert token_text(events) == expected_text(300, seed=100 + i), ids[i]
        assert_well_formed(events)
        assert events[-1].type == "done", events[-1]
        assert all(e.data["reason"] == "worker_stopped" for e in events if e.type == "resumed")
        gaps += seams(events)
    assert len(gaps) >= 20, "every generation was handed over at least once"
    print(
        f"\nSIGTERM seams over {len(gaps)} hand-overs: median {statistics.median(gaps)} ms, "
        f"max {max(gaps)} ms"
    )
    assert max(gaps) < 1000, gaps


def deploy(worker: BrokerProcess) -> None:
    """Stop a worker as a deploy does (SIGTERM), and wait for it to exit."""
    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(20) == 0, worker.output()


async def test_a_cancel_while_a_continuation_waits_ends_it_cancelled_at_once(
    launch: Launcher, client: httpx.AsyncClient, store: aioredis.Redis
) -> None:
    api = launch.api(FAST_LEASE).url
    launch.worker(FAST_LEASE)
    stream_id = await create(client, api, max_tokens=400, rate=50)
    os.kill(await writer_pid(store, stream_id), signal.SIGKILL)
    await field_reaches(client, api, stream_id, "handover")
    pending = await state(client, api, stream_id)
    assert pending["status"] == "running"
    assert pending["handover"]["reason"] == "worker_lost"

    # No worker is running: the api ends the waiting continuation itself.
    cancelled = await client.post(f"{api}/v1/streams/{stream_id}/cancel")
    assert cancelled.status_code in (200, 202), cancelled.text

    with anyio.fail_after(DEADLINE):
        result = await watch(client, api, stream_id)
    assert_well_formed(result.events)
    assert result.events[-1].type == "done"
    assert result.events[-1].data["finish_reason"] == "cancelled"
    assert not [e for e in result.events if e.type == "resumed"]
    assert token_text(result.events) == expected_text(400)[: len(token_text(result.events))]


async def test_past_the_continuation_limit_a_lost_workers_answer_ends_explicitly(
    launch: Launcher, client: httpx.AsyncClient, store: aioredis.Redis
) -> None:
    """BROKER_MAX_CONTINUATIONS=1: the first lost worker's answer is continued, the second's
    ends with the explicit, retryable worker_lost."""
    env = {**FAST_LEASE, "BROKER_MAX_CONTINUATIONS": "1"}
    api = launch.api(env).url
    launch.worker(env)
    stream_id = await create(client, api, max_tokens=1000, rate=50)
    os.kill(await writer_pid(store, stream_id), signal.SIGKILL)
    launch.worker(env)
    await field_reaches(client, api, stream_id, "continuations", 1)
    os.kill(await writer_pid(store, stream_id), signal.SIGKILL)
    with anyio.fail_after(DEADLINE):
        result = await watch(client, api, stream_id)

    events = result.events
    assert_well_formed(events)
    assert sum(e.type == "resumed" for e in events) == 1
    assert events[-1].type == "error"
    assert events[-1].data["code"] == "worker_lost"
    assert events[-1].data["retryable"] is True
    assert "BROKER_MAX_CONTINUATIONS" in events[-1].data["message"]
    assert token_text(events) == expected_text(1000)[: len(token_text(events))]


@pytest.mark.parametrize("mode", ["prefix", "continue_final_message"])
async def test_an_openai_compatible_answer_is_continued_from_the_partial_answer(
    launch: Launcher, client: httpx.AsyncClient, store: aioredis.Redis, mode: str
) -> None:
    """The worker streaming from an OpenAI-compatible server is killed; the next one sends
    the original messages plus the partial answer, and the reader's text is the partial
    answer followed by the server's continuation: here, the whole uninterrupted answer."""
    with OpenAIServer() as upstream:
        env = {
            **FAST_LEASE,
            "OPENAI_BASE_URL": upstream.base_url,
            "BROKER_ROUTES": f"fake=fake,{PACED_MODEL}=openai:{mode},*=openai",
        }
        api = launch.api(env).url
        for _ in range(2):
            launch.worker(env)
        body = {"model": PACED_MODEL, "messages": MESSAGES, "max_tokens": 60, "pace_ms": 40}
        response = await client.post(f"{api}/v1/streams", json=body)
        assert response.status_code == 201, response.text
        stream_id = response.json()["id"]
        os.kill(await writer_pid(store, stream_id), signal.SIGKILL)
        with anyio.fail_after(DEADLINE):
            result = await watch(client, api, stream_id)

    events = result.events
    assert_one_continued_answer(events, echo_text(60))
    seam = next(i for i, e in enumerate(events) if e.type == "resumed")
    partial = token_text(events[:seam])
    assert partial, "the worker was killed after some tokens"
    continuations = [b for b in upstream.bodies if continuation_of(b) is not None]
    assert len(continuations) == 1
    (request,) = continuations
    assert request["messages"][: len(MESSAGES)] == MESSAGES
    assert request["messages"][-1]["role"] == "assistant"
    assert request["messages"][-1]["content"] == partial
    assert request["max_tokens"] == 60 - len(partial.split())
    if mode == "prefix":
        assert request["messages"][-1]["prefix"] is True
    else:
        assert (request["continue_final_message"], request["add_generation_prompt"]) == (
            True,
            False,
        )
