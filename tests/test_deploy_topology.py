"""The shipped topology, run from the shipped files, through the faults of a real deployment.

nginx (``infra/nginx``) in front of three api processes, two workers with their health
ports, Redis with Sentinel from ``infra/sentinel`` (``tests.support.topology``). Readers
watch generations through nginx, cutting their connections at random and resuming with
``Last-Event-ID`` wherever nginx sends them, while an api is SIGKILLed, a worker is
SIGKILLed and another api is rolled (SIGTERM: it drains, stops, and starts again on its
port). Every reader ends with the exact text, or with an explicit error (the killed
worker's generations end ``worker_lost``); none loses or repeats an event.

Then creates whose answers are lost: an api is SIGKILLed while creates with an
``Idempotency-Key`` are in flight to it and through nginx; every create that got no answer
(a reset, a 502) is sent again with its key, and each key ends with exactly one generation.

The figures are printed (``pytest -s``).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import anyio
import httpx
import pytest

from tests.support.failover_readers import FailoverReader, ReaderResult, tally
from tests.support.generations import create_request, expected_text
from tests.support.topology import Topology
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.e2e]

GENERATIONS = 12
READERS_PER_GENERATION = 3
#: 90 tokens at 20/s: each generation runs about 4.5 s, across every fault below.
TOKENS, RATE = 90, 20


@pytest.fixture
def topology() -> Iterator[Topology]:
    deployment = Topology()
    try:
        yield deployment
    finally:
        deployment.close()


async def create_through(client: httpx.AsyncClient, url: str, seed: int) -> str:
    response = await client.post(
        f"{url}/v1/streams",
        json=create_request(max_tokens=TOKENS, rate=RATE, seed=seed),
        headers={"Idempotency-Key": str(uuid.uuid4())},
    )
    assert response.status_code == 201, response.text
    stream_id: str = response.json()["id"]
    return stream_id


async def faults(
    topology: Topology, readers: list[FailoverReader], report: dict[str, float]
) -> None:
    """An api killed, a worker killed, an api rolled: a bad deploy day. The kills land once
    every reader has some of its text, so all of them hit running generations; the roll
    once the generations still running are well on (the killed worker's have stopped)."""

    async def until(tokens: int, *, by: Callable[[Iterable[int]], int]) -> None:
        await eventually_async(lambda: by(r.tokens for r in readers) >= tokens, timeout=30)

    await until(10, by=min)
    topology.apis[0].stop(signal.SIGKILL)
    await until(20, by=min)
    topology.workers[0].stop(signal.SIGKILL)
    await until(40, by=max)
    rolled_at = time.monotonic()
    await anyio.to_thread.run_sync(topology.apis[1].stop)  # SIGTERM: drain, then exit
    await anyio.to_thread.run_sync(topology.restart_api, 1)
    report["roll_seconds"] = time.monotonic() - rolled_at


async def test_readers_through_nginx_survive_an_api_kill_a_worker_kill_and_a_roll(
    topology: Topology,
) -> None:
    report: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=5)) as client:
        ids = [await create_through(client, topology.url, seed) for seed in range(GENERATIONS)]
        text = {seed: expected_text(TOKENS, seed) for seed in range(GENERATIONS)}
        readers = [
            FailoverReader(client, [topology.url], stream_id, text[seed], seat=seat)
            for seed, stream_id in enumerate(ids)
            for seat in range(READERS_PER_GENERATION)
        ]
        results: list[ReaderResult] = []
        deadline = time.monotonic() + 60

        async def read(reader: FailoverReader) -> None:
            results.append(await reader.run(deadline))

        async with anyio.create_task_group() as group:
            for reader in readers:
                group.start_soon(read, reader)
            group.start_soon(faults, topology, readers, report)

    counts = tally(results)
    cuts = sum(r.connections - 1 for r in results)
    print(
        f"\n{len(results)} readers of {GENERATIONS} generations through nginx, {cuts} "
        f"reconnections; outcomes {dict(counts)}; api roll (drain, stop, start) "
        f"{report['roll_seconds']:.1f} s"
    )
    assert all(r.repeated == 0 for r in results), [r for r in results if r.repeated]
    silent = [r for r in results if r.outcome == "silent"]
    assert not silent, silent
    explicit = {r.reason for r in results if r.outcome == "explicit"}
    assert explicit <= {"error:worker_lost"}, explicit
    # Both ways of ending happened: the surviving worker finished its generations exactly.
    assert counts["completed"] > 0
    # Every reader of one generation ended the same way, with the same text.
    by_stream: dict[str, set[tuple[str, str]]] = {}
    for r in results:
        by_stream.setdefault(r.stream_id, set()).add((r.reason, r.text))
    assert all(len(ends) == 1 for ends in by_stream.values()), by_stream


async def listed_keys(client: httpx.AsyncClient, url: str) -> Counter[str]:
    """How many generations carry each ``metadata.key``, over every page of the listing."""
    per_key: Counter[str] = Counter()
    params: dict[str, str | int] = {"limit": 200}
    while True:
        page = await client.get(f"{url}/v1/streams", params=params)
        assert page.status_code == 200, page.text
        per_key.update(item["metadata"]["key"] for item in page.json()["data"])
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return per_key
        params["cursor"] = cursor


async def send(client: httpx.AsyncClient, url: str, key: str) -> int | None:
    """A keyed create: its status, or None when no answer came."""
    body = create_request(max_tokens=5, metadata={"key": key})
    try:
        response = await client.post(
            f"{url}/v1/streams", json=body, headers={"Idempotency-Key": key}
        )
    except httpx.TransportError:
        return None
    return response.status_code


async def send_again(client: httpx.AsyncClient, url: str, key: str) -> int:
    """What a client does with a create that got no answer: send it again, with its key,
    until one comes; the status that came."""
    for _ in range(50):
        status = await send(client, url, key)
        if status in (200, 201):
            return status
        await anyio.sleep(0.1)  # the client's back-off
    raise AssertionError(f"create {key} never answered")


async def test_creates_whose_answers_were_lost_make_one_generation_when_sent_again(
    topology: Topology,
) -> None:
    """Senders create in a loop, half straight to the api about to die (their connection
    drops), half through nginx (which may pass a keyed create on to another api itself).
    The api is killed with creates in every phase of their handling; each create that got
    no answer is sent again through nginx with its key."""
    victim = topology.apis[2]
    victim_url = f"http://127.0.0.1:{topology.api_ports[2]}"
    answered: Counter[str] = Counter()
    lost: list[str] = []  # keys whose first answer was lost
    replays: Counter[int] = Counter()  # the status that answered each of those at last
    sent: list[str] = []
    killed = anyio.Event()

    async def sender(client: httpx.AsyncClient, index: int) -> None:
        url = victim_url if index % 2 else topology.url
        while not killed.is_set():
            key = str(uuid.uuid4())
            sent.append(key)
            status = await send(client, url, key)
            answered[str(status)] += 1
            if status in (200, 201):
                continue
            lost.append(key)
            replays[await send_again(client, topology.url, key)] += 1
            return

    async with httpx.AsyncClient(timeout=10) as client:
        async with anyio.create_task_group() as group:
            for index in range(16):
                group.start_soon(sender, client, index)
            await eventually_async(lambda: answered["201"] >= 40, timeout=30)
            victim.stop(signal.SIGKILL)
            killed.set()
        per_key = await listed_keys(client, topology.url)

    print(
        f"\n{len(sent)} keyed creates, an api killed under them: first answers "
        f"{dict(answered)}; {len(lost)} lost and sent again, answered {dict(replays)} "
        "(200: the lost create had made its generation)"
    )
    assert lost, "the kill should have cut some creates"
    assert per_key == Counter(dict.fromkeys(sent, 1)), per_key
