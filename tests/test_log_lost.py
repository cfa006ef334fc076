"""Promise 7, loss is never silent: after Redis lost events a reader had received, its
resume gets an explicit 410 ``log_lost``; readers that saw nothing lost continue; live
readers are let go so that they resume and learn it. Real app in-process, real redis-server;
the loss itself is simulated (``tests.support.loss``), as a crash would leave it."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from starlette.testclient import TestClient

from broker.errors import SequenceConflict, StoreUnavailable
from broker.events import Event, EventType
from broker.generation_log import Claim, GenerationLog
from tests.support.loss import lose_events_after
from tests.support.processes import Launcher
from tests.support.redis_server import RedisServer
from tests.support.sse import decode_sse
from workers.attempt_failures import AttemptFailures
from workers.attempt_output import AttemptOutput

pytestmark = pytest.mark.redis

BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture
def client(launch: Launcher) -> TestClient:
    return launch.app()


def token(text: str) -> Event:
    return Event(EventType.TOKEN, {"text": text, "tokens": 1}, t=1)


def write_then_lose(redis_url: str, stream_id: str) -> None:
    """Events 1-5 written and read; Redis loses 4-5; the writer notices and ends at 4."""

    async def scenario() -> None:
        store = aioredis.Redis.from_url(redis_url)
        log = GenerationLog(store, retention_seconds=600)
        claim = await log.claim(stream_id, worker="w", lease_seconds=5)
        await log.writer(stream_id, claim, lease_seconds=5).append(
            Event(EventType.METADATA, {"id": stream_id}, t=0),
            token("a"),
            token("b"),
            token("c"),
            token("d"),
        )
        await lose_events_after(log, stream_id, kept=3)
        await log.mark_lost(stream_id, 4)
        resynced = Claim(attempt=claim.attempt, last_seq=3, cancel_requested=False)
        await log.writer(stream_id, resynced, lease_seconds=5).append(
            Event(EventType.ERROR, {"code": "log_lost", "message": "lost", "retryable": True}, t=2)
        )
        await store.aclose()

    asyncio.run(scenario())


def test_a_reader_that_saw_lost_events_is_told_and_one_that_did_not_continues(
    client: TestClient, redis_server: RedisServer
) -> None:
    stream_id = client.post("/v1/streams", json=BODY).json()["id"]
    write_then_lose(redis_server.url, stream_id)
    url = f"/v1/streams/{stream_id}/events"

    for saw_up_to in ("5", "4"):  # 4 exists again, but is not the event 4 they received
        response = client.get(url, headers={"Last-Event-ID": saw_up_to})
        assert response.status_code == 410, saw_up_to
        error = response.json()["error"]
        assert error["code"] == "log_lost"
        assert "up to 3" in error["message"]

    with client.stream("GET", url, headers={"Last-Event-ID": "3"}) as response:
        assert response.status_code == 200
        body = response.read().decode()
    assert [(f.id, f.event) for f in decode_sse(body)] == [("4", "error")]
    assert '"code":"log_lost"' in body

    state = client.get(f"/v1/streams/{stream_id}").json()
    assert state["lost_after_event_id"] == 3
    assert state["text"] == "ab"  # the tokens of events 2 and 3


@pytest.mark.parametrize("wire", ["openai", "ai-sdk"])
def test_a_reader_holding_frames_of_a_lost_event_is_told_too(
    client: TestClient, redis_server: RedisServer, wire: str
) -> None:
    """``3.1`` holds a frame of event 4, which the store lost: the same 410, not the rest
    of whatever event 4 is now (review: the sub-id skipped the check)."""
    stream_id = client.post("/v1/streams", json=BODY).json()["id"]
    write_then_lose(redis_server.url, stream_id)
    url = f"/v1/streams/{stream_id}/events"
    for holds in ("3.1", "3.2", "4.1"):
        response = client.get(url, params={"format": wire}, headers={"Last-Event-ID": holds})
        assert response.status_code == 410, (holds, response.text)
        assert response.json()["error"]["code"] == "log_lost"
    response = client.get(url, params={"format": wire}, headers={"Last-Event-ID": "2.1"})
    assert response.status_code == 200  # a frame of event 3, which the store still has


@pytest.mark.parametrize("wire", ["openai", "ai-sdk"])
def test_frames_of_an_event_never_sent_are_refused(client: TestClient, wire: str) -> None:
    """A queued generation has no event yet: ``0.1`` claims a frame of event 1, which was
    never sent. Waiting for event 1 and skipping its first frame would lose that frame."""
    stream_id = client.post("/v1/streams", json={**BODY, "model": "fake"}).json()["id"]
    url = f"/v1/streams/{stream_id}/events"
    response = client.get(url, params={"format": wire}, headers={"Last-Event-ID": "0.1"})
    assert response.status_code == 410  # no worker here: the log is empty, event 1 unsent
    assert response.json()["error"]["code"] == "log_lost"


@pytest.mark.anyio
async def test_live_readers_of_a_log_that_lost_events_are_let_go(
    redis_server: RedisServer, redis: aioredis.Redis
) -> None:
    """No event past the hub's cursor will ever come (the log restarts lower), so the hub
    ends those subscriptions; the clients reconnect and get ``log_lost``."""
    import anyio

    from api.hub import ReaderHub
    from api.watch import watch_frames
    from tests.support.generations import claimed

    log = GenerationLog(redis, retention_seconds=600)
    stream_id, writer = await claimed(log)
    await writer.append(Event(EventType.METADATA, {"id": stream_id}, t=0))
    received: list[str] = []
    five = anyio.Event()

    async with ReaderHub(redis_server.url, redis, buffer_frames=100, check_seconds=0.1) as hub:

        async def reader() -> None:
            async for chunk in watch_frames(log, hub, stream_id, 0):
                received.append(chunk.decode())
                if "id: 5\n" in chunk.decode():
                    five.set()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as group:
                group.start_soon(reader)
                for text in "abcd":
                    await writer.append(token(text))
                await five.wait()
                await lose_events_after(log, stream_id, kept=3)
            # The reader's response ended by itself (the task group waited for it).
    body = "".join(received)
    assert "id: 5\n" in body
    assert "event: done" not in body
    assert "event: error" not in body


def test_a_refused_resume_costs_no_replay_of_the_log(
    client: TestClient, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ai-sdk resume reads the log up to its resume point (the encoder's state): a
    request refused by the tenant's connection limit must be refused before that, or each
    retry of an over-limit client would read a whole log (review)."""
    import api.event_stream
    from api.errors import ApiError

    stream_id = client.post("/v1/streams", json=BODY).json()["id"]
    write_then_lose(redis_server.url, stream_id)  # a log of events 1-4
    log = client.app.state.services.log  # type: ignore[attr-defined]
    reads: list[int] = []
    real_read = log.read

    async def counted_read(*args: object, **kwargs: object) -> object:
        reads.append(1)
        return await real_read(*args, **kwargs)

    async def refuse(*_: object) -> None:
        raise ApiError(429, "too_many_connections", "over the limit")

    monkeypatch.setattr(log, "read", counted_read)
    monkeypatch.setattr(api.event_stream, "take_connection_slot", refuse)
    url = f"/v1/streams/{stream_id}/events"
    response = client.get(url, params={"format": "ai-sdk"}, headers={"Last-Event-ID": "3"})
    assert response.status_code == 429
    assert reads == []


class RecordingFails(GenerationLog):
    """A log whose ``mark_lost`` fails ``failures`` times (a pooled connection still on a
    demoted master answers ``NOREPLICAS``), then works."""

    def __init__(self, redis: aioredis.Redis, failures: int) -> None:
        super().__init__(redis, retention_seconds=600)
        self.failures = failures

    async def mark_lost(self, stream_id: str, first_lost: int) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("NOREPLICAS Not enough good replicas to write.")
        await super().mark_lost(stream_id, first_lost)


def writer_meets_the_loss(redis_url: str, stream_id: str, failures: int) -> str:
    """The worker's own path: events 1-5 written (and read), the store loses 4-5, the
    writer's next append finds the log short and its job ends the attempt."""

    async def scenario() -> str:
        store = aioredis.Redis.from_url(redis_url)
        log = RecordingFails(store, failures)
        claim = await log.claim(stream_id, worker="w", lease_seconds=0.3)
        output = AttemptOutput(log.writer(stream_id, claim, lease_seconds=0.3), origin_ms=0)
        await output.append(Event(EventType.METADATA, {"id": stream_id}, t=0))
        await output.append(token("a"), token("b"), token("c"), token("d"))
        await lose_events_after(log, stream_id, kept=3)
        with pytest.raises(SequenceConflict) as conflict:
            await output.append(token("e"))
        attempt_failures = AttemptFailures(output, log, lease_seconds=0.3, about={})
        ended = await attempt_failures.end(conflict.value)
        await store.aclose()
        return ended

    return asyncio.run(scenario())


@pytest.mark.parametrize("failures", [1, 1_000])
def test_a_loss_the_writer_cannot_record_at_once_never_answers_204(
    client: TestClient, redis_server: RedisServer, failures: int
) -> None:
    """Recording the loss fails (once: it is retried like an append; for good: no end is
    written at the first lost id, the sweeper is left to end it). Either way a reader
    holding the lost event 4 is told, never answered 204 as if it held the end."""
    stream_id = client.post("/v1/streams", json=BODY).json()["id"]
    assert writer_meets_the_loss(redis_server.url, stream_id, failures) == "log_lost"
    held_4 = client.get(f"/v1/streams/{stream_id}/events", headers={"Last-Event-ID": "4"})
    assert held_4.status_code == 410, held_4.text
    assert held_4.json()["error"]["code"] == "log_lost"
    if failures == 1:  # recorded on the retry: the end stands, after what was kept
        held_3 = client.get(f"/v1/streams/{stream_id}/events", headers={"Last-Event-ID": "3"})
        assert [frame.event for frame in decode_sse(held_3.text)] == ["error"]
