"""The lease sweeper against a real redis-server: a generation whose writer stopped renewing
ends with one retryable ``worker_lost`` error, the writer is fenced, live ones are left alone,
and the lease index does not keep what it no longer needs.

The sweep takes the clock as an argument, so a lapsed lease is a ``now`` past it, not a wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.constants import job_key_prefix

from broker import keys
from broker.errors import ClaimRefused, StaleWriter, StoreUnavailable
from broker.events import Event, EventType
from broker.generation_log import GenerationLog, LogWriter
from broker.state import GenerationState, Status, now_ms
from broker.sweeper import LeaseSweeper
from tests.support.replication import LATER, LEASE, queued

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def running(log: GenerationLog, *texts: str) -> tuple[str, LogWriter]:
    """A generation a worker claimed and wrote metadata and ``texts`` to."""
    state = queued()
    await log.create(state)
    claim = await log.claim(state.id, worker="w1", lease_seconds=LEASE)
    writer = log.writer(state.id, claim, lease_seconds=LEASE)
    batch = [Event(EventType.METADATA, {"id": state.id}, t=0)]
    batch += [Event(EventType.TOKEN, {"text": t, "tokens": 1}, t=1) for t in texts]
    await writer.append(*batch)
    return state.id, writer


@pytest.fixture
def log(redis: aioredis.Redis) -> GenerationLog:
    return GenerationLog(redis, retention_seconds=600)


@pytest.fixture
def sweeper(log: GenerationLog) -> LeaseSweeper:
    return LeaseSweeper(log, owner="sweeper-1", lease_seconds=LEASE)


async def test_a_lapsed_lease_ends_the_stream_with_one_retryable_error(
    log: GenerationLog, sweeper: LeaseSweeper, redis: aioredis.Redis
) -> None:
    stream_id, writer = await running(log, "Hello", " world")

    assert await sweeper.sweep_once(now=now_ms()) == []  # the lease still holds
    assert await sweeper.sweep_once(now=now_ms() + LATER) == [stream_id]

    events = await log.read(stream_id, 0)
    assert [e.type for e in events] == [
        EventType.METADATA,
        EventType.TOKEN,
        EventType.TOKEN,
        EventType.ERROR,
    ]
    assert events[-1].data["code"] == "worker_lost"
    assert events[-1].data["retryable"] is True
    state = await log.get(stream_id)
    assert state.status is Status.FAILED
    assert state.text == "Hello world"  # what readers saw stands
    # The writer that stopped is fenced: it can never add to the stream again.
    with pytest.raises(StaleWriter):
        await writer.append(Event(EventType.TOKEN, {"text": "!", "tokens": 1}, t=2))
    with pytest.raises(StaleWriter):
        await writer.renew()
    assert await redis.zcard(keys.LEASES_KEY) == 0


async def test_a_writer_that_died_before_its_first_event_still_gets_metadata_first(
    log: GenerationLog, sweeper: LeaseSweeper
) -> None:
    state = queued()
    await log.create(state)
    await log.claim(state.id, worker="w1", lease_seconds=LEASE)

    assert await sweeper.sweep_once(now=now_ms() + LATER) == [state.id]

    events = await log.read(state.id, 0)
    assert [e.type for e in events] == [EventType.METADATA, EventType.ERROR]
    assert events[0].data["id"] == state.id


async def test_renewing_keeps_a_generation_out_of_the_sweep(
    log: GenerationLog, sweeper: LeaseSweeper, redis: aioredis.Redis
) -> None:
    stream_id, writer = await running(log, "a")
    first = await redis.zscore(keys.LEASES_KEY, stream_id)
    assert first is not None
    # Pretend time passed: the lease index must follow each renewal.
    await redis.hset(keys.meta_key(stream_id), "lease_until_ms", 0)
    await redis.zadd(keys.LEASES_KEY, {stream_id: 0})
    await writer.renew()

    assert await sweeper.sweep_once(now=now_ms()) == []
    renewed = await redis.zscore(keys.LEASES_KEY, stream_id)
    assert renewed is not None
    assert renewed >= first
    assert (await log.get(stream_id)).status is Status.RUNNING


async def test_an_index_entry_behind_the_real_lease_is_moved_not_swept(
    log: GenerationLog, sweeper: LeaseSweeper, redis: aioredis.Redis
) -> None:
    """The index is a hint; the lease in the meta hash decides."""
    stream_id, _ = await running(log, "a")
    await redis.zadd(keys.LEASES_KEY, {stream_id: 0})

    assert await sweeper.sweep_once(now=now_ms()) == []
    lease_until = int(await redis.hget(keys.meta_key(stream_id), "lease_until_ms"))
    assert await redis.zscore(keys.LEASES_KEY, stream_id) == lease_until
    assert (await log.get(stream_id)).status is Status.RUNNING


async def test_ended_and_vanished_generations_leave_the_index(
    log: GenerationLog, sweeper: LeaseSweeper, redis: aioredis.Redis
) -> None:
    finished, writer = await running(log, "a")
    await writer.append(Event(EventType.DONE, {"finish_reason": "stop", "usage": {}}, t=3))
    assert await redis.zscore(keys.LEASES_KEY, finished) is None  # the writer let go itself

    vanished, _ = await running(log, "b")
    await redis.delete(*keys.generation_keys(vanished))
    await redis.zadd(keys.LEASES_KEY, {finished: 0})  # as if the writer's release was lost

    assert await sweeper.sweep_once(now=now_ms() + LATER) == []
    assert await redis.zcard(keys.LEASES_KEY) == 0
    assert (await log.get(finished)).status is Status.COMPLETED


async def test_concurrent_sweepers_end_a_stream_exactly_once(
    log: GenerationLog, redis: aioredis.Redis
) -> None:
    ids = [(await running(log, "x"))[0] for _ in range(10)]
    sweepers = [LeaseSweeper(log, owner=f"s{i}", lease_seconds=LEASE) for i in range(4)]
    later = now_ms() + LATER

    swept = await asyncio.gather(*(s.sweep_once(now=later) for s in sweepers))

    assert sorted(i for one in swept for i in one) == sorted(ids)
    for stream_id in ids:
        events = await log.read(stream_id, 0)
        assert [e.type for e in events].count(EventType.ERROR) == 1
        assert events[-1].type is EventType.ERROR


async def test_a_cancel_request_is_honoured_when_the_writer_is_gone(
    log: GenerationLog, sweeper: LeaseSweeper
) -> None:
    """A client that asked to cancel gets the ``cancelled`` end it asked for."""
    stream_id, _ = await running(log, "a")
    await log.request_cancel(stream_id)

    assert await sweeper.sweep_once(now=now_ms() + LATER) == [stream_id]

    last = (await log.read(stream_id, 0))[-1]
    assert last.type is EventType.DONE
    assert last.data["finish_reason"] == "cancelled"
    assert (await log.get(stream_id)).status is Status.CANCELLED


SKEW_MS = 10 * 60_000  # ten minutes: far more than any lease


async def test_a_sweeper_whose_clock_runs_ahead_leaves_live_leases_alone(
    log: GenerationLog, sweeper: LeaseSweeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: lease expiry compared the writer's clock with the sweeper's, so a host
    whose clock ran ahead by a lease took over live generations. Leases are now reckoned on
    Redis's clock alone."""
    stream_id, _ = await running(log, "Hello")
    ahead = now_ms() + SKEW_MS
    for module in ("broker.sweeper", "broker.generation_log", "broker.state"):
        monkeypatch.setattr(f"{module}.now_ms", lambda: ahead)

    assert await sweeper.sweep_once() == []
    assert (await log.get(stream_id)).status is Status.RUNNING


async def test_a_writer_whose_clock_runs_behind_still_holds_its_lease(
    log: GenerationLog, sweeper: LeaseSweeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    behind = now_ms() - SKEW_MS
    monkeypatch.setattr("broker.generation_log.now_ms", lambda: behind)
    stream_id, writer = await running(log, "Hello")
    await writer.renew()
    monkeypatch.undo()

    assert await sweeper.sweep_once() == []
    assert (await log.get(stream_id)).status is Status.RUNNING


async def test_a_claim_whose_reply_was_lost_is_still_swept(
    log: GenerationLog, sweeper: LeaseSweeper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the lease index was written after the claim, so a claim that landed
    while its process died (or its reply was lost) left the generation running, in no
    index, for good. The index entry now comes first."""
    state = queued()
    await log.create(state)
    real_claim = log._claim_script

    async def claim_then_lose_the_reply(**kwargs: object) -> object:
        await real_claim(**kwargs)  # type: ignore[arg-type]
        raise StoreUnavailable("the connection dropped before the reply")

    monkeypatch.setattr(log, "_claim_script", claim_then_lose_the_reply)
    with pytest.raises(StoreUnavailable):
        await log.claim(state.id, worker="w-doomed", lease_seconds=LEASE)
    assert (await log.get(state.id)).status is Status.RUNNING

    assert await sweeper.sweep_once(now=now_ms() + LATER) == [state.id]
    events = await log.read(state.id, 0)
    assert [e.type for e in events] == [EventType.METADATA, EventType.ERROR]
    assert events[-1].data["code"] == "worker_lost"


async def test_a_generation_no_worker_started_ends_when_its_job_expires(
    redis: aioredis.Redis, sweeper: LeaseSweeper
) -> None:
    """Regression: arq drops a job nobody started within its expiry (a day), and its
    generation stayed ``queued`` until retention deleted it. It now ends then, explicitly."""
    log = GenerationLog(redis, retention_seconds=600, queue_timeout_seconds=120)
    state = queued()
    await log.create(state)
    # The job's record expires with the queue deadline: arq cannot run it after that.
    job_ttl_ms = await redis.pttl(job_key_prefix + keys.job_id(state.id))
    assert 110_000 < job_ttl_ms <= 120_000

    assert await sweeper.sweep_once(now=state.created_at_ms + 119_000) == []
    assert (await log.get(state.id)).status is Status.QUEUED
    assert await sweeper.sweep_once(now=state.created_at_ms + 121_000) == [state.id]

    events = await log.read(state.id, 0)
    assert [e.type for e in events] == [EventType.METADATA, EventType.ERROR]
    assert events[-1].data["code"] == "queue_timeout"
    assert events[-1].data["retryable"] is True
    final = await log.get(state.id)
    assert final.status is Status.FAILED
    assert await redis.zscore(keys.LEASES_KEY, state.id) is None


async def test_a_worker_that_starts_a_queued_generation_keeps_it_from_the_sweeper(
    log: GenerationLog, sweeper: LeaseSweeper
) -> None:
    state = queued()
    await log.create(state)
    claim = await log.claim(state.id, worker="w1", lease_seconds=LEASE)
    writer = log.writer(state.id, claim, lease_seconds=LEASE)
    await writer.append(Event(EventType.METADATA, {"id": state.id}, t=0))

    assert await sweeper.sweep_once() == []
    assert (await log.get(state.id)).status is Status.RUNNING


async def test_a_worker_may_not_start_a_generation_past_its_queue_deadline(
    redis: aioredis.Redis, sweeper: LeaseSweeper
) -> None:
    """Regression (review): a worker that read the arq job just before it expired claimed
    the generation after its queue deadline, fencing the sweeper that was ending it."""
    log = GenerationLog(redis, retention_seconds=600, queue_timeout_seconds=60)
    state = dataclasses.replace(queued(), created_at_ms=now_ms() - 10 * 60_000)
    await log.create(state)
    with pytest.raises(ClaimRefused):
        await log.claim(state.id, worker="w-late", lease_seconds=LEASE)
    # (The refused claim's index entry puts the next look a lease later.)
    assert await sweeper.sweep_once(now=now_ms() + LATER) == [state.id]
    events = await log.read(state.id, 0)
    assert [e.type for e in events] == [EventType.METADATA, EventType.ERROR]
    assert events[-1].data["code"] == "queue_timeout"


async def test_a_worker_may_not_take_back_a_generation_a_sweeper_is_ending(
    log: GenerationLog, sweeper: LeaseSweeper
) -> None:
    """Regression (review): an arq retry of a lapsed generation's job claimed it while a
    sweeper held it; the sweeper's end was fenced, and its clean-up removed the index entry
    of the new claim: if that worker died too, nothing ever ended the generation."""
    stream_id, _ = await running(log, "Hello")
    found = await log.take_over(
        stream_id, owner="sweeper:other", lease_seconds=LEASE, now=now_ms() + LATER
    )
    assert found.claim is not None
    with pytest.raises(ClaimRefused):
        await log.claim(stream_id, worker="w-retry", lease_seconds=LEASE)
    assert (
        await log.end_claimed(
            stream_id,
            found.claim,
            lambda t: Event(EventType.DONE, {"finish_reason": "stop", "usage": None}, t=t),
        )
        is not None
    )
    assert (await log.get(stream_id)).status is Status.COMPLETED


async def test_a_sweep_whose_end_was_fenced_leaves_the_new_writers_index_entry(
    log: GenerationLog,
    sweeper: LeaseSweeper,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A writer that claims a generation back from a sweeper whose own lease lapsed (it
    stalled) fences the sweeper's end; the sweep must then leave the writer's index entry,
    or nothing would find the generation if that writer dies too."""
    stream_id, _ = await running(log, "Hello")
    real_end = log.end_claimed

    async def a_writer_claims_it_back_first(*args: Any, **kwargs: Any) -> GenerationState | None:
        # The sweeper stalls past its lease (set lapsed here), and a worker claims.
        await redis.hset(keys.meta_key(stream_id), "lease_until_ms", "0")  # type: ignore[misc]
        await log.claim(stream_id, worker="w-new", lease_seconds=LEASE)
        return await real_end(*args, **kwargs)

    monkeypatch.setattr(log, "end_claimed", a_writer_claims_it_back_first)
    assert await sweeper.sweep_once(now=now_ms() + LATER) == []
    assert await redis.zscore(keys.LEASES_KEY, stream_id) is not None
    assert (await log.get(stream_id)).status is Status.RUNNING
