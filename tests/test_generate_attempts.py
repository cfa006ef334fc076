"""Claims, attempts and leases of the generate job, against fakeredis with a scripted
provider: a re-run after a lost worker ends the stream ``worker_lost``; a missing or ended
generation is skipped without writing; a writer that lost its claim stops without
appending (the new attempt continues the log); a quiet provider keeps its lease, and a
writer gets a whole lease after each recovery of the store."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from broker import keys
from broker.errors import StoreUnavailable
from broker.events import Event, EventType
from broker.generation_log import RECORD_PENDING_MS, Claim, GenerationLog
from broker.state import Status, new_stream_id, now_ms
from broker.sweeper import LeaseSweeper
from tests.support.generation_job import (
    MODEL,
    Call,
    ScriptedProvider,
    StandInProviders,
    check_log,
    create,
    deltas,
    ended_as,
    events_of,
    finish,
    job,
    left_by_a_lost_worker,
    new_state,
    run,
    settings,
    token_text,
)
from tests.support.waiting import eventually_async
from workers.providers.base import Finish, TextDelta

pytestmark = pytest.mark.anyio


async def test_a_missing_generation_is_skipped_and_nothing_is_written(
    log: GenerationLog,
) -> None:
    stream_id = new_stream_id()
    provider = ScriptedProvider(deltas("nothing"))

    assert await run(log, provider, stream_id) == "skipped"

    assert provider.calls == 0
    assert await log.redis.exists(*keys.generation_keys(stream_id)) == 0


async def test_a_job_taken_before_its_record_waits_for_it_then_runs(
    log: GenerationLog,
) -> None:
    """On a Redis Cluster the api queues the job before it writes the record, so a worker
    may take the job first: it looks again until the record is there."""
    state = new_state()
    provider = ScriptedProvider(deltas("late but whole"))
    taken = job(log, StandInProviders(provider), state.id, enqueued_ms=now_ms())
    task = asyncio.create_task(taken.run())
    # The claim puts the id in the lease index before it looks for the record.
    await eventually_async(lambda: log.redis.zscore(keys.LEASES_KEY, state.id))
    assert not task.done()

    await log.create(state)

    assert await finish(task) == "completed"
    assert token_text(await events_of(log, state.id)) == "late but whole"


async def test_a_job_whose_record_never_came_is_dropped_after_the_grace(
    log: GenerationLog,
) -> None:
    stream_id = new_stream_id()
    provider = ScriptedProvider(deltas("nothing"))
    queued_at = now_ms() - RECORD_PENDING_MS + 50  # the grace ends in 50 ms

    taken = job(log, StandInProviders(provider), stream_id, enqueued_ms=queued_at)
    assert await finish(asyncio.create_task(taken.run())) == "skipped"
    assert provider.calls == 0


async def test_an_attempt_after_a_lost_worker_ends_with_a_retryable_error(
    log: GenerationLog,
) -> None:
    state = await create(log)
    await left_by_a_lost_worker(log, state)
    provider = ScriptedProvider(deltas("a different answer"))

    events = await ended_as("worker_lost", log, provider, state.id)
    assert [e.type for e in events] == [EventType.METADATA, EventType.TOKEN, EventType.ERROR]
    assert events[-1].data["code"] == "worker_lost"
    assert events[-1].data["retryable"] is True
    assert provider.calls == 0
    final = await log.get(state.id)
    assert final.status is Status.FAILED
    assert final.attempt == 2
    assert final.text == "Half"


async def test_an_ended_generation_is_skipped_and_nothing_is_appended(
    log: GenerationLog,
) -> None:
    state = await create(log)
    assert await run(log, ScriptedProvider(deltas("the answer")), state.id) == "completed"
    before = await events_of(log, state.id)
    second = ScriptedProvider(deltas("another answer"))

    assert await run(log, second, state.id) == "skipped"

    assert await events_of(log, state.id) == before
    assert second.calls == 0
    final = await log.get(state.id)
    assert final.text == "the answer"
    assert final.attempt == 1


async def test_a_writer_that_lost_its_claim_stops_without_appending(
    log: GenerationLog,
) -> None:
    state = await create(log)
    takeovers: list[Claim] = []

    async def take_over() -> None:
        takeovers.append(await log.claim(state.id, worker="w-new", lease_seconds=5))

    provider = ScriptedProvider(
        [*deltas("before the takeover"), Call(take_over), *deltas(" after it"), Finish("stop")]
    )

    assert await run(log, provider, state.id) == "fenced"

    (takeover,) = takeovers
    assert takeover.attempt == 2
    events = await events_of(log, state.id)
    check_log(events, terminal=False)
    assert events[-1].seq == takeover.last_seq
    assert "after" not in token_text(events)
    final = await log.get(state.id)
    assert final.last_seq == takeover.last_seq
    assert final.status is Status.RUNNING
    assert provider.closed
    # The new attempt owns the log and continues right where the old one was stopped.
    new_writer = log.writer(state.id, takeover, lease_seconds=5)
    stored = await new_writer.append(Event(EventType.DONE, {"finish_reason": "stop"}))
    assert stored[0].seq == takeover.last_seq + 1


async def test_a_quiet_provider_keeps_its_lease_whatever_the_cancel_poll(
    log: GenerationLog,
) -> None:
    """Regression: the lease was renewed only at the cancel poll, so a cancel poll longer
    than the lease (8 s against 5 s) let a sweeper take over a healthy job. The renewal
    cadence now follows the lease; here a 1 s lease, an 8 s cancel poll and a provider
    quiet for 2.5 s, with a sweeper passing every 50 ms on Redis's own clock."""
    state = await create(log)
    sweeper = LeaseSweeper(log, owner="sweeper-test", lease_seconds=1)
    provider = ScriptedProvider(
        [TextDelta("before"), Call(lambda: asyncio.sleep(2.5)), TextDelta(" after")]
    )
    config = settings(lease_seconds=1.0, cancel_poll_ms=8000.0)
    swept: list[str] = []

    async def sweep_meanwhile() -> None:
        while True:
            swept.extend(await sweeper.sweep_once())
            await asyncio.sleep(0.05)

    sweeping = asyncio.create_task(sweep_meanwhile())
    try:
        outcome = await run(log, provider, state.id, config)
    finally:
        sweeping.cancel()
    assert swept == []
    assert outcome == "completed"
    events = await events_of(log, state.id)
    check_log(events)
    assert token_text(events) == "before after"


async def test_a_writer_gets_a_whole_lease_after_each_recovery(log: GenerationLog) -> None:
    """Regression (review): after an outage the writer reckoned its lease from the first try
    of the append, not the one that succeeded, so a second outage soon after was given up
    on early, though Redis had renewed the lease at the recovery."""
    state = await create(log)
    claim = await log.claim(state.id, worker="w1", lease_seconds=0.6)
    writer = log.writer(state.id, claim, lease_seconds=0.6)
    real_append = log.append_batch
    down_until = 0.0

    async def append_unless_down(*args: Any, **kwargs: Any) -> tuple[int, bool]:
        if time.monotonic() < down_until:
            raise StoreUnavailable("Redis is down")
        return await real_append(*args, **kwargs)

    log.append_batch = append_unless_down  # type: ignore[method-assign]
    await writer.append(Event(EventType.METADATA, {"model": MODEL}))
    for text in ("one", " two"):  # two outages of 0.4 s, each inside the 0.6 s lease
        down_until = time.monotonic() + 0.4
        await writer.append(Event(EventType.TOKEN, {"text": text, "tokens": 1}))
    assert token_text(await events_of(log, state.id)) == "one two"
