"""The log's contract: fencing, sequencing, terminal events, reads, expiry.

Every test runs against a real redis-server, and again against the embedded fakeredis TCP
server that ``streambroker dev`` uses when no redis-server is installed, so the scripts'
refusals and blocking reads are proven on both stores that run the broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from broker import keys
from broker.cli.embedded_store import EmbeddedStore
from broker.errors import (
    GenerationEnded,
    GenerationNotFound,
    SequenceConflict,
    StaleWriter,
    StoreUnavailable,
)
from broker.events import Event, EventType
from broker.generation_log import GenerationLog
from broker.state import GenerationState, Status, new_stream_id, now_ms
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture(scope="module")
def embedded_fakeredis() -> Iterator[EmbeddedStore]:
    with EmbeddedStore("fakeredis") as store:
        yield store


@pytest.fixture(params=["redis-server", "embedded-fakeredis"])
async def redis(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[aioredis.Redis]:
    if request.param == "redis-server":
        url = redis_server.url
    else:
        url = request.getfixturevalue("embedded_fakeredis").url
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    yield client
    await client.aclose()


def queued(model: str = "fake") -> GenerationState:
    return GenerationState(
        id=new_stream_id(),
        model=model,
        status=Status.QUEUED,
        created_at_ms=now_ms(),
        request={"model": model, "messages": [{"role": "user", "content": "hi"}]},
    )


def token(text: str) -> Event:
    return Event(EventType.TOKEN, {"text": text, "tokens": 1})


async def started(log: GenerationLog) -> tuple[GenerationState, object]:
    state = queued()
    await log.create(state)
    claim = await log.claim(state.id, worker="w1", lease_seconds=5)
    return state, log.writer(state.id, claim, lease_seconds=5)


async def test_create_then_get_round_trips_the_state(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state = queued()
    await log.create(state)
    got = await log.get(state.id)
    assert got.status is Status.QUEUED
    assert got.request == state.request
    assert got.created_at_ms == state.created_at_ms
    assert await redis.zscore(keys.INDEX_KEY, state.id) == state.created_at_ms


async def test_create_queues_the_job_that_arq_reads_as_generate_of_this_stream(
    redis: aioredis.Redis,
) -> None:
    """The api writes arq's job record itself (in the create's transaction): arq must read it
    as the ``generate`` job of this stream, queued now."""
    from arq.connections import ArqRedis
    from arq.jobs import Job, JobStatus

    from broker.jobs import GENERATE_JOB

    log = GenerationLog(redis, retention_seconds=60)
    state = queued()
    await log.create(state)
    job_id = keys.job_id(state.id)
    job = Job(job_id, ArqRedis(connection_pool=redis.connection_pool), keys.QUEUE_NAME)
    assert await job.status() == JobStatus.queued
    info = await job.info()
    assert info is not None
    assert (info.function, info.args, info.kwargs) == (GENERATE_JOB, (state.id,), {})
    assert await redis.zscore(keys.QUEUE_NAME, job_id) == state.created_at_ms


async def test_unknown_generation_is_not_found(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    with pytest.raises(GenerationNotFound):
        await log.get(new_stream_id())
    with pytest.raises(GenerationNotFound):
        await log.claim(new_stream_id(), worker="w", lease_seconds=1)
    with pytest.raises(GenerationNotFound):
        await log.request_cancel(new_stream_id())


async def test_appends_get_dense_sequence_numbers_and_build_the_text(
    redis: aioredis.Redis,
) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, writer = await started(log)
    first = await writer.append(Event(EventType.METADATA, {"model": "fake"}))
    batch = await writer.append(token("Hel"), token("lo"))
    assert [e.seq for e in first + batch] == [1, 2, 3]
    got = await log.get(state.id)
    assert got.text == "Hello"
    assert got.last_seq == 3
    assert got.status is Status.RUNNING
    assert got.first_token_at_ms is not None


async def test_a_stale_attempt_cannot_append_and_changes_nothing(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, old = await started(log)
    await old.append(token("a"))
    takeover = await log.claim(state.id, worker="w2", lease_seconds=5)
    assert takeover.attempt == 2
    assert takeover.last_seq == 1
    with pytest.raises(StaleWriter):
        await old.append(token("b"))
    new = log.writer(state.id, takeover, lease_seconds=5)
    await new.append(token("c"))
    assert (await log.get(state.id)).text == "ac"
    assert [e.seq for e in await log.read(state.id, 0)] == [1, 2]


async def test_a_duplicate_sequence_number_is_refused(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, writer = await started(log)
    await writer.append(token("a"), token("b"))
    writer.next_seq = 2  # as if a retried append replayed an already-stored batch
    with pytest.raises(SequenceConflict) as info:
        await writer.append(token("b"))
    assert info.value.actual_last == 2
    assert (await log.get(state.id)).text == "ab"
    assert len(await log.read(state.id, 0)) == 2


async def test_terminal_event_records_the_result_and_ends_appends(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, writer = await started(log)
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    await writer.append(
        token("x"), Event(EventType.DONE, {"finish_reason": "stop", "usage": usage})
    )
    got = await log.get(state.id)
    assert got.status is Status.COMPLETED
    assert got.finish_reason == "stop"
    assert got.usage == usage
    assert got.finished_at_ms is not None
    with pytest.raises(GenerationEnded):
        await writer.append(token("late"))
    with pytest.raises(GenerationEnded):
        await log.claim(state.id, worker="w2", lease_seconds=5)
    assert (await log.get(state.id)).text == "x"


async def test_error_event_marks_failed_and_cancelled_done_marks_cancelled(
    redis: aioredis.Redis,
) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    failed, writer = await started(log)
    await writer.append(
        Event(EventType.ERROR, {"code": "boom", "message": "m", "retryable": False})
    )
    assert (await log.get(failed.id)).status is Status.FAILED
    assert (await log.get(failed.id)).error == {"code": "boom", "message": "m", "retryable": False}
    cancelled, writer = await started(log)
    await writer.append(Event(EventType.DONE, {"finish_reason": "cancelled", "usage": None}))
    assert (await log.get(cancelled.id)).status is Status.CANCELLED


async def test_a_terminal_event_must_end_its_batch(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, writer = await started(log)
    with pytest.raises(ValueError, match="terminal"):
        await writer.append(Event(EventType.DONE, {"finish_reason": "stop"}), token("x"))
    assert await log.read(state.id, 0) == []


async def test_cancel_request_reaches_the_writer_through_its_next_append(
    redis: aioredis.Redis,
) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, writer = await started(log)
    await writer.append(token("a"))
    assert not writer.cancel_requested
    assert await log.request_cancel(state.id) is Status.RUNNING
    await writer.append(token("b"))
    assert writer.cancel_requested
    assert (await log.get(state.id)).cancel_requested


async def test_cancelling_an_ended_generation_keeps_its_result(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, writer = await started(log)
    await writer.append(Event(EventType.DONE, {"finish_reason": "stop", "usage": None}))
    assert await log.request_cancel(state.id) is Status.COMPLETED
    got = await log.get(state.id)
    assert got.status is Status.COMPLETED
    assert not got.cancel_requested


async def test_read_returns_the_range_after_a_resume_point(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, writer = await started(log)
    await writer.append(*[token(str(i)) for i in range(10)])
    after_four = await log.read(state.id, 4)
    assert [e.seq for e in after_four] == [5, 6, 7, 8, 9, 10]
    assert [e.data["text"] for e in after_four] == ["4", "5", "6", "7", "8", "9"]
    assert [e.seq for e in await log.read(state.id, 0, count=3)] == [1, 2, 3]
    assert await log.read(state.id, 10) == []


async def test_blocking_read_wakes_on_append(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, writer = await started(log)
    reader = asyncio.create_task(log.read(state.id, 0, block_ms=10_000))
    await asyncio.sleep(0)  # let the reader send XREAD before the append
    await writer.append(token("live"))
    events = await asyncio.wait_for(reader, 5)
    assert [(e.seq, e.data["text"]) for e in events] == [(1, "live")]


async def test_blocking_read_of_a_queued_generation_times_out_empty(
    redis: aioredis.Redis,
) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state = queued()
    await log.create(state)
    assert await log.read(state.id, 0, block_ms=50) == []


async def test_retention_applies_to_every_key_and_then_the_generation_is_gone(
    redis: aioredis.Redis,
) -> None:
    log = GenerationLog(redis, retention_seconds=1)
    state, writer = await started(log)
    await writer.append(token("a"), Event(EventType.DONE, {"finish_reason": "stop"}))
    for key in keys.generation_keys(state.id):
        assert 0 < await redis.ttl(key) <= 1

    async def expired() -> bool:
        return not await redis.exists(*keys.generation_keys(state.id))

    await eventually_async(expired, timeout=5, interval=0.05, what="the keys to expire")
    with pytest.raises(GenerationNotFound):
        await log.get(state.id)


async def test_renew_extends_the_lease_and_reports_a_cancel(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, writer = await started(log)
    before = int(await redis.hget(keys.meta_key(state.id), "lease_until_ms"))
    writer.lease_seconds = 30
    await writer.renew()
    after = int(await redis.hget(keys.meta_key(state.id), "lease_until_ms"))
    assert after >= before + 20_000
    assert not writer.cancel_requested
    await log.request_cancel(state.id)
    await writer.renew()
    assert writer.cancel_requested


async def test_renew_tells_a_stalled_writer_it_was_fenced(redis: aioredis.Redis) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, old = await started(log)
    takeover = await log.claim(state.id, worker="w2", lease_seconds=5)
    with pytest.raises(StaleWriter):
        await old.renew()
    new = log.writer(state.id, takeover, lease_seconds=5)
    await new.append(Event(EventType.DONE, {"finish_reason": "stop", "usage": None}))
    with pytest.raises(GenerationEnded):
        await new.renew()


async def test_a_batch_whose_reply_was_lost_is_retried_without_writing_twice(
    redis: aioredis.Redis,
) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, writer = await started(log)
    real_append = log.append_batch
    calls = 0

    async def reply_lost_once(*args: object, **kwargs: object) -> tuple[int, bool]:
        nonlocal calls
        calls += 1
        result = await real_append(*args, **kwargs)  # type: ignore[arg-type]
        if calls == 1:
            raise StoreUnavailable("the reply was lost after the script ran")
        return result

    log.append_batch = reply_lost_once  # type: ignore[method-assign]
    stored = await writer.append(token("a"), token("b"))
    assert calls == 2
    assert [e.seq for e in stored] == [1, 2]
    assert [e.data["text"] for e in await log.read(state.id, 0)] == ["a", "b"]
    assert (await log.get(state.id)).text == "ab"
    assert writer.next_seq == 3


async def test_a_different_batch_at_a_taken_sequence_number_is_still_refused(
    redis: aioredis.Redis,
) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    state, writer = await started(log)
    await writer.append(token("a"))
    writer.next_seq = 1  # as after a lost reply: the writer does not know "a" landed
    with pytest.raises(SequenceConflict):
        await writer.append(
            Event(EventType.ERROR, {"code": "x", "message": "m", "retryable": True})
        )
    assert (await log.get(state.id)).status is Status.RUNNING
    assert [e.type for e in await log.read(state.id, 0)] == [EventType.TOKEN]


async def test_creating_trims_index_entries_older_than_the_retention(
    redis: aioredis.Redis,
) -> None:
    log = GenerationLog(redis, retention_seconds=60)
    old = dataclasses.replace(queued(), created_at_ms=now_ms() - 120_000)
    await log.create(old)
    fresh = queued()
    await log.create(fresh)
    assert await redis.zscore(keys.INDEX_KEY, old.id) is None
    assert await redis.zscore(keys.INDEX_KEY, fresh.id) is not None
