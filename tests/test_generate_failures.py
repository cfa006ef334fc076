"""The generate job when something fails, against fakeredis with a scripted provider: a
provider error (before or after tokens), a provider that crashes, a model nobody serves,
events the store lost, and a store outage after a lost reply. Each ends the stream with
exactly one ``error`` event saying what happened, and keeps the text sent before it."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from broker.errors import StoreUnavailable
from broker.events import EventType
from broker.generation_log import GenerationLog
from broker.state import Status
from tests.support.generation_job import (
    WAIT,
    Call,
    Gate,
    ScriptedProvider,
    StandInProviders,
    check_log,
    create,
    deltas,
    ended_as,
    events_of,
    finish,
    job,
    run,
    running,
    settings,
    token_text,
    wait_for_log,
)
from tests.support.loss import lose_events_after
from workers.providers.base import Finish, ProviderError, TextDelta

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("retryable", "retry_after"), [(True, 2.5), (False, None)])
async def test_a_provider_error_ends_with_an_error_event(
    log: GenerationLog, retryable: bool, retry_after: float | None
) -> None:
    state = await create(log)
    failure = ProviderError(
        "upstream_overloaded",
        "the upstream is overloaded",
        retryable=retryable,
        retry_after=retry_after,
    )
    provider = ScriptedProvider([*deltas("partial answer"), failure, TextDelta(" never")])

    events = await ended_as("failed", log, provider, state.id)
    error = events[-1]
    assert error.type is EventType.ERROR
    assert error.data["code"] == "upstream_overloaded"
    assert error.data["message"] == "the upstream is overloaded"
    assert error.data["retryable"] is retryable
    assert error.data.get("retry_after") == retry_after
    assert token_text(events) == "partial answer"
    final = await log.get(state.id)
    assert final.status is Status.FAILED
    assert final.text == "partial answer"
    assert final.error is not None
    assert final.error["code"] == "upstream_overloaded"
    assert final.error["retryable"] is retryable
    assert provider.closed


async def test_a_provider_error_before_any_token(log: GenerationLog) -> None:
    state = await create(log)
    provider = ScriptedProvider([ProviderError("bad_key", "the key was refused", retryable=False)])

    events = await ended_as("failed", log, provider, state.id)
    assert [e.type for e in events] == [EventType.METADATA, EventType.ERROR]
    assert events[-1].data["code"] == "bad_key"
    assert (await log.get(state.id)).text == ""


async def test_an_unexpected_provider_crash_still_ends_the_stream(log: GenerationLog) -> None:
    state = await create(log)
    provider = ScriptedProvider([TextDelta("Hi"), RuntimeError("bug in a provider")])

    events = await ended_as("internal_error", log, provider, state.id)
    assert events[-1].type is EventType.ERROR
    assert events[-1].data["code"] == "internal_error"
    assert events[-1].data["retryable"] is True
    assert token_text(events) == "Hi"
    assert (await log.get(state.id)).status is Status.FAILED


async def test_an_unroutable_model_ends_with_an_error(log: GenerationLog) -> None:
    state = await create(log, model="nobody-serves-this")
    providers = StandInProviders(None)

    assert await run(log, None, state.id, providers=providers) == "unroutable_model"

    assert providers.asked == ["nobody-serves-this"]
    events = await events_of(log, state.id)
    check_log(events)
    assert [e.type for e in events] == [EventType.METADATA, EventType.ERROR]
    assert events[-1].data["code"] == "unroutable_model"
    assert events[-1].data["retryable"] is False
    assert (await log.get(state.id)).status is Status.FAILED


async def test_events_the_store_lost_end_the_stream_with_log_lost_and_are_recorded(
    log: GenerationLog,
) -> None:
    state = await create(log)

    async def crash_after_three_events() -> None:
        await wait_for_log(log, state.id, lambda events: len(events) >= 3)
        await lose_events_after(log, state.id, kept=1)  # the tokens are gone

    provider = ScriptedProvider(
        [*deltas("one two three four"), Call(crash_after_three_events), *deltas(" five six")]
    )

    events = await ended_as("log_lost", log, provider, state.id)
    assert [e.type for e in events] == [EventType.METADATA, EventType.ERROR]
    assert events[-1].data["code"] == "log_lost"
    assert events[-1].data["retryable"] is True
    final = await log.get(state.id)
    assert final.lost_from_seq == 2
    assert final.to_api()["lost_after_event_id"] == 1
    assert final.text == ""
    assert final.status is Status.FAILED


async def test_a_lost_reply_and_an_outage_still_end_the_stream_once(log: GenerationLog) -> None:
    """Regression (review 1.1): a batch that landed but whose reply was lost, followed by an
    outage longer than the writer's retries, left the stream 'running' with no terminal
    event. The job must resynchronise with the log and end it, without duplicating text."""
    state = await create(log)
    gate = Gate()
    provider = ScriptedProvider([TextDelta("Hi"), gate, TextDelta(" there"), Finish("stop")])
    real_append = log.append_batch
    lose_next = False
    down_until = 0.0

    async def flaky_append(*args: Any, **kwargs: Any) -> tuple[int, bool]:
        nonlocal lose_next, down_until
        if time.monotonic() < down_until:
            raise StoreUnavailable("Redis is down")
        result = await real_append(*args, **kwargs)
        if lose_next:
            # Down for 1.5 leases: longer than the append's retries (a lease), shorter
            # than those and the retries of the job's final event (another lease).
            lose_next, down_until = False, time.monotonic() + 1.5
            raise StoreUnavailable("the reply was lost")
        return result

    log.append_batch = flaky_append  # type: ignore[method-assign]
    # No renewals meanwhile (they would meet the outage first): the cancel poll is long.
    config = settings(lease_seconds=1.0, cancel_poll_ms=10_000.0)
    the_job = job(log, StandInProviders(provider), state.id, config)
    async with running(the_job) as task:
        with anyio.fail_after(WAIT):
            await gate.reached.wait()
        # The provider runs ahead of the appends: wait until "Hi" is stored, so the batch
        # whose reply is lost is " there".
        await wait_for_log(log, state.id, lambda seen: token_text(seen) == "Hi")
        lose_next = True
        gate.release.set()
        outcome = await finish(task)

    events = await events_of(log, state.id)
    check_log(events)
    assert token_text(events) == "Hi there"
    final = await log.get(state.id)
    assert final.text == "Hi there"
    # The outage outlasted the writer's retries (a 1 s lease), so the job gave up on the
    # generation, but still ended it, after the batch that had landed, and said why.
    assert outcome == "store_unavailable"
    assert events[-1].data["code"] == "store_unavailable"
    assert events[-1].data["retryable"] is True
    assert final.status is Status.FAILED
