"""The generate job against fakeredis, driven by a scripted provider the test controls."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import fakeredis
import fakeredis.aioredis
import pytest

from broker import keys
from broker.errors import StoreUnavailable
from broker.events import Event, EventType
from broker.generation_log import Claim, GenerationLog
from broker.request import GenerationRequest
from broker.settings import GenerationSettings
from broker.state import GenerationState, Status, iso_ms, new_stream_id, now_ms
from broker.sweeper import LeaseSweeper
from tests.support.loss import lose_events_after
from workers.generate import GenerationJob, WorkerRuntime
from workers.providers.base import (
    Chunk,
    Finish,
    ProviderError,
    TextDelta,
    ToolCallDelta,
    Usage,
)

pytestmark = pytest.mark.anyio

MODEL = "scripted"
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "Tell me a story"}]
WAIT = 10.0  # the bound on every wait; a healthy run takes milliseconds


class Gate:
    """A point in the script where the provider stops until the test releases it."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.release = asyncio.Event()


@dataclasses.dataclass
class Call:
    """A step that runs an async function inside the provider (e.g. a takeover)."""

    fn: Callable[[], Awaitable[object]]


Step = Chunk | Gate | Call | BaseException


class ScriptedProvider:
    name = "scripted"

    def __init__(self, steps: list[Step], *, on_close: Gate | None = None) -> None:
        self.steps = steps
        #: A gate the provider's cleanup waits on, like an upstream request that closes slowly.
        self.on_close = on_close
        self.calls = 0
        self.closed = False
        self.requests: list[GenerationRequest] = []

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        self.calls += 1
        self.requests.append(request)
        try:
            for step in self.steps:
                if isinstance(step, Gate):
                    step.reached.set()
                    await step.release.wait()
                elif isinstance(step, Call):
                    await step.fn()
                elif isinstance(step, BaseException):
                    raise step
                else:
                    yield step
        finally:
            self.closed = True
            if self.on_close is not None:
                self.on_close.reached.set()
                await self.on_close.release.wait()

    async def aclose(self) -> None:
        return None


class StandInProviders:
    def __init__(self, provider: ScriptedProvider | None) -> None:
        self.provider = provider
        self.asked: list[str] = []

    def for_model(self, model: str) -> ScriptedProvider | None:
        self.asked.append(model)
        return self.provider

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def log() -> AsyncIterator[GenerationLog]:
    redis = fakeredis.aioredis.FakeRedis(server=fakeredis.FakeServer())
    yield GenerationLog(redis, retention_seconds=600)
    await redis.aclose()


def settings(**changes: Any) -> GenerationSettings:
    base = {"batch_max_age_ms": 5.0, "progress_interval_ms": 600_000.0, "cancel_poll_ms": 10.0}
    return dataclasses.replace(GenerationSettings(), **{**base, **changes})


async def create(
    log: GenerationLog, *, model: str = MODEL, max_tokens: int | None = None
) -> GenerationState:
    request = GenerationRequest(
        model=model, messages=MESSAGES, max_tokens=max_tokens, metadata={"session": "s-1"}
    )
    state = GenerationState(
        id=new_stream_id(),
        model=model,
        status=Status.QUEUED,
        created_at_ms=now_ms(),
        request=request.to_dict(),
        metadata={"session": "s-1"},
    )
    await log.create(state)
    return state


def job(
    log: GenerationLog,
    providers: StandInProviders,
    stream_id: str,
    config: GenerationSettings | None = None,
) -> GenerationJob:
    runtime = WorkerRuntime(
        log=log,
        providers=providers,  # type: ignore[arg-type]
        settings=config or settings(),
        worker_id="w-test",
    )
    return GenerationJob(runtime, stream_id)


async def finish(task: asyncio.Task[str]) -> str:
    """The job's result, waited for without cancelling it (a bounded wait)."""
    done, _ = await asyncio.wait({task}, timeout=WAIT)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
        pytest.fail(f"the job did not finish within {WAIT} s")
    return task.result()


@contextlib.asynccontextmanager
async def running(job: GenerationJob) -> AsyncIterator[asyncio.Task[str]]:
    """The job as a task the test can watch; never left running when the test fails."""
    task = asyncio.create_task(job.run())
    try:
        yield task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)


async def run(
    log: GenerationLog,
    provider: ScriptedProvider | None,
    stream_id: str,
    config: GenerationSettings | None = None,
    providers: StandInProviders | None = None,
) -> str:
    providers = providers or StandInProviders(provider)
    return await finish(asyncio.create_task(job(log, providers, stream_id, config).run()))


async def wait_for_log(
    log: GenerationLog, stream_id: str, until: Callable[[list[Event]], bool]
) -> list[Event]:
    """Tail the log (blocking reads, bounded overall) until ``until`` holds for it."""
    events: list[Event] = []
    with anyio.fail_after(WAIT):
        while not until(events):
            after = events[-1].seq if events else 0
            events += await log.read(stream_id, after, block_ms=100)
    return events


async def events_of(log: GenerationLog, stream_id: str) -> list[Event]:
    return await log.read(stream_id, 0, count=100_000)


def check_log(events: list[Event], *, terminal: bool = True) -> None:
    """Dense ids from 1, metadata first, and (when ended) exactly one terminal event, last."""
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type is EventType.METADATA
    assert [e.type for e in events].count(EventType.METADATA) == 1
    terminals = [e for e in events if e.terminal]
    if terminal:
        assert len(terminals) == 1
        assert events[-1].terminal
    else:
        assert terminals == []
    assert all(e.t >= 0 for e in events)


def token_text(events: list[Event]) -> str:
    return "".join(e.data["text"] for e in events if e.type is EventType.TOKEN)


def token_count(events: list[Event]) -> int:
    return sum(e.data["tokens"] for e in events if e.type is EventType.TOKEN)


def deltas(text: str) -> list[Chunk]:
    words = text.split(" ")
    return [TextDelta(w if i == 0 else " " + w) for i, w in enumerate(words)]


STORY = "Once upon a time a broker streamed every token to each reader, exactly once."


async def test_a_generation_streams_its_tokens_and_ends_with_done(log: GenerationLog) -> None:
    state = await create(log, max_tokens=50)
    chunks = deltas(STORY)
    provider = ScriptedProvider([*chunks, Finish("stop"), Usage(4, len(chunks), 4 + len(chunks))])
    providers = StandInProviders(provider)

    assert await run(log, None, state.id, providers=providers) == "completed"

    events = await events_of(log, state.id)
    check_log(events)
    metadata = events[0].data
    assert metadata["model"] == MODEL
    assert metadata["created_at"] == iso_ms(state.created_at_ms)
    assert metadata["metadata"] == {"session": "s-1"}
    assert token_text(events) == STORY
    assert token_count(events) == len(chunks)
    done = events[-1]
    assert done.type is EventType.DONE
    assert done.data["finish_reason"] == "stop"
    assert done.data["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": len(chunks),
        "total_tokens": 4 + len(chunks),
    }
    final = await log.get(state.id)
    assert final.text == STORY
    assert final.status is Status.COMPLETED
    assert final.finish_reason == "stop"
    assert final.usage == done.data["usage"]
    assert final.last_seq == len(events)
    assert final.attempt == 1
    assert providers.asked == [MODEL]
    assert provider.calls == 1
    assert provider.requests == [GenerationRequest.from_dict(state.request)]
    assert provider.closed


async def test_the_first_token_goes_out_at_once_then_batches_up_to_the_cap(
    log: GenerationLog,
) -> None:
    state = await create(log)
    chunks = [TextDelta(f"t{i} ") for i in range(10)]
    provider = ScriptedProvider([*chunks, Finish("stop")])
    config = settings(batch_max_age_ms=10_000.0, batch_max_tokens=4)

    assert await run(log, provider, state.id, config) == "completed"

    events = await events_of(log, state.id)
    check_log(events)
    tokens = [e for e in events if e.type is EventType.TOKEN]
    # A window that never lapses: the first token alone, then full batches, then the rest.
    assert [e.data["tokens"] for e in tokens] == [1, 4, 4, 1]
    assert [e.data["text"] for e in tokens] == ["t0 ", "t1 t2 t3 t4 ", "t5 t6 t7 t8 ", "t9 "]


async def test_without_finish_or_usage_done_counts_the_streamed_tokens(
    log: GenerationLog,
) -> None:
    state = await create(log)
    provider = ScriptedProvider(deltas("just three words"))

    assert await run(log, provider, state.id) == "completed"

    events = await events_of(log, state.id)
    check_log(events)
    done = events[-1]
    assert done.type is EventType.DONE
    assert done.data["finish_reason"] == "stop"
    assert done.data["usage"] == {"prompt_tokens": 0, "completion_tokens": 3, "total_tokens": 3}


async def test_the_finish_reason_is_the_providers(log: GenerationLog) -> None:
    state = await create(log, max_tokens=2)
    provider = ScriptedProvider([*deltas("cut short"), Finish("length"), Usage(1, 2, 3)])

    assert await run(log, provider, state.id) == "completed"

    events = await events_of(log, state.id)
    assert events[-1].data["finish_reason"] == "length"
    assert (await log.get(state.id)).finish_reason == "length"


async def test_tool_call_deltas_become_tool_call_events_in_order(log: GenerationLog) -> None:
    state = await create(log)
    provider = ScriptedProvider(
        [
            TextDelta("Let me"),
            TextDelta(" check."),
            ToolCallDelta(index=0, id="call_1", name="weather", arguments='{"city":'),
            ToolCallDelta(index=0, arguments=' "Oslo"}'),
            ToolCallDelta(index=1, id="call_2", name="time", arguments="{}"),
            TextDelta(" Done"),
            Finish("tool_calls"),
            Usage(5, 3, 8),
        ]
    )

    assert await run(log, provider, state.id) == "completed"

    events = await events_of(log, state.id)
    check_log(events)
    # The shape of the log with progress left out and consecutive token batches merged.
    shape: list[tuple[str, Any]] = []
    for e in events:
        if e.type is EventType.PROGRESS:
            continue
        if e.type is EventType.TOKEN and shape and shape[-1][0] == "token":
            shape[-1] = ("token", shape[-1][1] + e.data["text"])
        elif e.type is EventType.TOKEN:
            shape.append(("token", e.data["text"]))
        elif e.type is EventType.TOOL_CALL:
            shape.append(
                ("tool_call", (e.data["index"], e.data["id"], e.data["name"], e.data["arguments"]))
            )
        else:
            shape.append((e.type.value, None))
    assert shape == [
        ("metadata", None),
        ("token", "Let me check."),
        ("tool_call", (0, "call_1", "weather", '{"city":')),
        ("tool_call", (0, None, None, ' "Oslo"}')),
        ("tool_call", (1, "call_2", "time", "{}")),
        ("token", " Done"),
        ("done", None),
    ]
    assert events[-1].data["finish_reason"] == "tool_calls"
    final = await log.get(state.id)
    assert final.text == "Let me check. Done"
    assert final.status is Status.COMPLETED


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

    assert await run(log, provider, state.id) == "failed"

    events = await events_of(log, state.id)
    check_log(events)
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

    assert await run(log, provider, state.id) == "failed"

    events = await events_of(log, state.id)
    check_log(events)
    assert [e.type for e in events] == [EventType.METADATA, EventType.ERROR]
    assert events[-1].data["code"] == "bad_key"
    assert (await log.get(state.id)).text == ""


async def test_an_unexpected_provider_crash_still_ends_the_stream(log: GenerationLog) -> None:
    state = await create(log)
    provider = ScriptedProvider([TextDelta("Hi"), RuntimeError("bug in a provider")])

    assert await run(log, provider, state.id) == "internal_error"

    events = await events_of(log, state.id)
    check_log(events)
    assert events[-1].type is EventType.ERROR
    assert events[-1].data["code"] == "internal_error"
    assert events[-1].data["retryable"] is True
    assert token_text(events) == "Hi"
    assert (await log.get(state.id)).status is Status.FAILED


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

    assert await run(log, provider, state.id) == "cancelled"

    events = await events_of(log, state.id)
    check_log(events)
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


async def test_an_attempt_after_a_lost_worker_ends_with_a_retryable_error(
    log: GenerationLog,
) -> None:
    state = await create(log)
    first = await log.claim(state.id, worker="w-dead", lease_seconds=5)
    dead = log.writer(state.id, first, lease_seconds=5)
    await dead.append(
        Event(EventType.METADATA, {"model": MODEL}),
        Event(EventType.TOKEN, {"text": "Half", "tokens": 1}),
    )
    provider = ScriptedProvider(deltas("a different answer"))

    assert await run(log, provider, state.id) == "worker_lost"

    events = await events_of(log, state.id)
    check_log(events)
    assert [e.type for e in events] == [EventType.METADATA, EventType.TOKEN, EventType.ERROR]
    assert events[-1].data["code"] == "worker_lost"
    assert events[-1].data["retryable"] is True
    assert provider.calls == 0
    final = await log.get(state.id)
    assert final.status is Status.FAILED
    assert final.attempt == 2
    assert final.text == "Half"


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


async def test_a_missing_generation_is_skipped_and_nothing_is_written(
    log: GenerationLog,
) -> None:
    stream_id = new_stream_id()
    provider = ScriptedProvider(deltas("nothing"))

    assert await run(log, provider, stream_id) == "skipped"

    assert provider.calls == 0
    assert await log.redis.exists(*keys.generation_keys(stream_id)) == 0


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

    assert await run(log, provider, state.id) == "log_lost"

    events = await events_of(log, state.id)
    check_log(events)
    assert [e.type for e in events] == [EventType.METADATA, EventType.ERROR]
    assert events[-1].data["code"] == "log_lost"
    assert events[-1].data["retryable"] is True
    final = await log.get(state.id)
    assert final.lost_from_seq == 2
    assert final.to_api()["lost_after_event_id"] == 1
    assert final.text == ""
    assert final.status is Status.FAILED


async def test_progress_events_report_growing_token_counts(log: GenerationLog) -> None:
    state = await create(log, max_tokens=6)
    steps: list[Step] = []
    for chunk in deltas("a slow model makes progress visible"):
        steps += [Call(lambda: asyncio.sleep(0.02)), chunk]  # pacing of a slow model
    provider = ScriptedProvider([*steps, Finish("stop")])
    config = settings(batch_max_age_ms=0.0, progress_interval_ms=10.0)

    assert await run(log, provider, state.id, config) == "completed"

    events = await events_of(log, state.id)
    check_log(events)
    progress = [e for e in events if e.type is EventType.PROGRESS]
    assert len(progress) >= 3
    counts = [p.data["tokens"] for p in progress]
    assert counts == sorted(set(counts)), "progress token counts must strictly increase"
    # Each report counts exactly the tokens appended before it.
    seen = 0
    for e in events:
        if e.type is EventType.TOKEN:
            seen += e.data["tokens"]
        elif e.type is EventType.PROGRESS:
            assert e.data["tokens"] == seen
            assert e.data["estimated_total"] == 6
            assert 0 < e.data["percent"] <= 100
            if e.data["tokens"] > 1:
                assert e.data["tokens_per_second"] > 0
    assert seen == 6
    assert token_text(events) == "a slow model makes progress visible"


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


async def test_the_last_progress_event_counts_every_token(log: GenerationLog) -> None:
    state = await create(log, max_tokens=6)

    async def every_token_stored() -> None:
        await wait_for_log(log, state.id, lambda seen: token_count(seen) == 6)

    # The last batch is appended before the provider finishes, so the job's final flush
    # has no text left: the final progress must still be reported.
    provider = ScriptedProvider([*deltas("a b c d e f"), Call(every_token_stored), Finish("stop")])
    await run(log, provider, state.id, settings(progress_interval_ms=600_000.0))
    events = await events_of(log, state.id)
    progress = [e for e in events if e.type is EventType.PROGRESS]
    assert progress
    assert progress[-1].data["tokens"] == token_count(events) == 6
    assert progress[-1].data["percent"] == 100.0
    last_token = max(e.seq for e in events if e.type is EventType.TOKEN)
    assert progress[-1].seq > last_token


async def test_an_attempt_after_a_lost_worker_honours_a_cancel(log: GenerationLog) -> None:
    """Regression: the re-run path ended a stream whose client had asked to cancel with
    ``worker_lost`` instead of the ``done`` / ``cancelled`` the client asked for."""
    state = await create(log)
    first = await log.claim(state.id, worker="w-dead", lease_seconds=5)
    dead = log.writer(state.id, first, lease_seconds=5)
    await dead.append(
        Event(EventType.METADATA, {"model": MODEL}),
        Event(EventType.TOKEN, {"text": "Half", "tokens": 1}),
    )
    assert await log.request_cancel(state.id) is Status.RUNNING
    provider = ScriptedProvider(deltas("a different answer"))

    assert await run(log, provider, state.id) == "cancelled"

    events = await events_of(log, state.id)
    check_log(events)
    assert [e.type for e in events] == [EventType.METADATA, EventType.TOKEN, EventType.DONE]
    assert events[-1].data["finish_reason"] == "cancelled"
    assert provider.calls == 0
    final = await log.get(state.id)
    assert final.status is Status.CANCELLED
    assert final.text == "Half"


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
