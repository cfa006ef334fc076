"""Cancelling a generation, against fakeredis with a scripted provider: a cancel asked
mid-stream, before the job started, or while a re-run takes over from a lost worker ends
the stream with ``done``/``cancelled`` (its usage like every ``done``) and closes the
provider; a job cancelled from outside (arq's timeout, a worker's shutdown) stays
cancelled."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from broker.events import EventType
from broker.generation_log import GenerationLog
from broker.state import Status
from tests.support.generation_job import (
    WAIT,
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
    left_by_a_lost_worker,
    run,
    running,
    token_text,
    wait_for_log,
)
from workers.providers.base import Finish, TextDelta

pytestmark = pytest.mark.anyio


async def test_a_cancel_mid_stream_ends_with_done_cancelled_and_closes_the_provider(
    log: GenerationLog,
) -> None:
    state = await create(log)
    gate = Gate()
    provider = ScriptedProvider(
        [TextDelta("Hello"), TextDelta(" world"), gate, TextDelta(" never"), Finish("stop")]
    )
    async with running(job(log, StandInProviders(provider), state.id)) as task:
        with anyio.fail_after(WAIT):
            await gate.reached.wait()
        # Every token is appended before the cancel, so only the job's own poll can notice it.
        await wait_for_log(log, state.id, lambda events: token_text(events) == "Hello world")
        assert await log.request_cancel(state.id) is Status.RUNNING

        assert await finish(task) == "cancelled"
    assert provider.closed, "the provider's stream was not closed"
    assert not gate.release.is_set()
    events = await events_of(log, state.id)
    check_log(events)
    done = events[-1]
    assert done.type is EventType.DONE
    assert done.data["finish_reason"] == "cancelled"
    assert done.data["usage"]["completion_tokens"] == 2
    assert token_text(events) == "Hello world"
    final = await log.get(state.id)
    assert final.status is Status.CANCELLED
    assert final.finish_reason == "cancelled"
    assert final.text == "Hello world"


async def test_a_job_cancelled_from_outside_while_closing_the_provider_stays_cancelled(
    log: GenerationLog,
) -> None:
    # arq cancels the job on its timeout and at worker shutdown. That cancellation must
    # propagate even when it arrives while the job waits for the provider to close.
    state = await create(log)
    gate, closing = Gate(), Gate()
    provider = ScriptedProvider([TextDelta("Hi"), gate], on_close=closing)
    async with running(job(log, StandInProviders(provider), state.id)) as task:
        with anyio.fail_after(WAIT):
            await gate.reached.wait()
        await wait_for_log(log, state.id, lambda events: token_text(events) == "Hi")
        await log.request_cancel(state.id)
        with anyio.fail_after(WAIT):
            await closing.reached.wait()  # the job appended done and now closes the provider

        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=WAIT)

    assert task in done
    assert task.cancelled(), f"the job swallowed its cancellation and returned {task.result()!r}"
    events = await events_of(log, state.id)
    check_log(events)
    assert events[-1].data["finish_reason"] == "cancelled"


async def test_a_cancel_before_the_job_starts_skips_the_provider(log: GenerationLog) -> None:
    state = await create(log)
    assert await log.request_cancel(state.id) is Status.QUEUED
    provider = ScriptedProvider(deltas("should not be generated"))

    events = await ended_as("cancelled", log, provider, state.id)
    assert [e.type for e in events] == [EventType.METADATA, EventType.DONE]
    assert events[-1].data["finish_reason"] == "cancelled"
    assert provider.calls == 0
    final = await log.get(state.id)
    assert final.status is Status.CANCELLED
    assert final.text == ""


async def test_a_cancel_before_the_job_starts_reports_usage_like_every_done(
    log: GenerationLog,
) -> None:
    # The contract: done carries {"finish_reason", "usage": {prompt_tokens, completion_tokens,
    # total_tokens}}; a cancel that came before any token has zero of each, not null.
    state = await create(log)
    await log.request_cancel(state.id)

    assert await run(log, ScriptedProvider([]), state.id) == "cancelled"

    usage = (await events_of(log, state.id))[-1].data["usage"]
    assert isinstance(usage, dict)
    assert usage["completion_tokens"] == 0
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert (await log.get(state.id)).usage == usage


async def test_an_attempt_after_a_lost_worker_honours_a_cancel(log: GenerationLog) -> None:
    """Regression: the re-run path ended a stream whose client had asked to cancel with
    ``worker_lost`` instead of the ``done`` / ``cancelled`` the client asked for."""
    state = await create(log)
    await left_by_a_lost_worker(log, state)
    assert await log.request_cancel(state.id) is Status.RUNNING
    provider = ScriptedProvider(deltas("a different answer"))

    events = await ended_as("cancelled", log, provider, state.id)
    assert [e.type for e in events] == [EventType.METADATA, EventType.TOKEN, EventType.DONE]
    assert events[-1].data["finish_reason"] == "cancelled"
    assert provider.calls == 0
    final = await log.get(state.id)
    assert final.status is Status.CANCELLED
    assert final.text == "Half"
