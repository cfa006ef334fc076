"""Continuing a generation whose writer was lost or stopped, at the level of the job, the
sweeper and the scripts (fakeredis; the real processes are ``test_continuation_e2e``): a
sweep hands a lost fake generation over and its continuation makes exactly the text of an
uninterrupted run, under the next ids; only the pending continuation's job may claim it; the
old writer can append nothing; cancel wins; the limit, a tool call and an ``off`` route end
it explicitly; a stopping worker hands over at once."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from broker import jobs, keys, metrics
from broker.errors import ClaimRefused, StaleWriter, StoreUnavailable
from broker.events import Event, EventType
from broker.generation_log import Claim, GenerationLog, LogWriter
from broker.request import FakeOptions, GenerationRequest
from broker.setting_fields import Continuation, Route
from broker.state import GenerationState, Status, new_stream_id, now_ms
from broker.sweeper import LeaseSweeper
from tests.support.generation_job import (
    ScriptedProvider,
    StandInProviders,
    check_log,
    deltas,
    events_of,
    finish,
    job,
    settings,
    token_text,
    wait_for_log,
)
from workers.generate import WorkerRuntime
from workers.providers.base import Finish, Usage
from workers.providers.fake import FakeProvider, fake_tokens

pytestmark = pytest.mark.anyio

MESSAGES = [{"role": "user", "content": "Tell me about logs"}]
MAX_TOKENS = 40
LEASE = 5.0
#: A sweep this far ahead sees every lease lapsed (Redis's clock stands in otherwise).
LATER = 60_000


def fake_state(*, tokens_per_second: float = 10_000.0) -> GenerationState:
    request = GenerationRequest(
        model="fake",
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        fake=FakeOptions(tokens_per_second=tokens_per_second, seed=7),
    )
    return GenerationState(
        id=new_stream_id(),
        model="fake",
        status=Status.QUEUED,
        created_at_ms=now_ms(),
        request=request.to_dict(),
    )


def uninterrupted() -> str:
    return "".join(fake_tokens(MESSAGES, MAX_TOKENS, 7))


def fake_providers() -> StandInProviders:
    return StandInProviders(FakeProvider(default_max_tokens=MAX_TOKENS))  # type: ignore[arg-type]


async def lost_after(log: GenerationLog, state: GenerationState, tokens: int) -> LogWriter:
    """The generation as a worker that died left it: metadata and the fake's first
    ``tokens`` tokens in two batches, no end. Returns the dead worker's writer."""
    await log.create(state)
    claim = await log.claim(state.id, worker="w-dead", lease_seconds=LEASE)
    writer = log.writer(state.id, claim, lease_seconds=LEASE)
    words = fake_tokens(MESSAGES, MAX_TOKENS, 7)[:tokens]
    half = tokens // 2
    await writer.append(
        Event(EventType.METADATA, {"model": "fake"}),
        Event(EventType.TOKEN, {"text": "".join(words[:half]), "tokens": half}),
    )
    await writer.append(
        Event(EventType.TOKEN, {"text": "".join(words[half:]), "tokens": tokens - half})
    )
    return writer


def sweeper(
    log: GenerationLog, *, routes: tuple[Route, ...] | None = None, limit: int = 2
) -> LeaseSweeper:
    return LeaseSweeper(
        log,
        owner="s-test",
        lease_seconds=LEASE,
        routes=routes if routes is not None else (Route("fake", "fake"), Route("*", "openai")),
        max_continuations=limit,
    )


async def continue_job(
    log: GenerationLog,
    stream_id: str,
    number: int,
    providers: StandInProviders | None = None,
    **changes: object,
) -> str:
    taken = job(
        log, providers or fake_providers(), stream_id, settings(**changes), continuation=number
    )
    return await finish(asyncio.create_task(taken.run()))


async def queued_continuations(log: GenerationLog, stream_id: str) -> list[str]:
    """The queued continuation jobs of the generation, as ``<number>.<times queued>``."""
    prefix = keys.continuation_job_id(stream_id, 0, 0).removesuffix("0.0")
    queued = await log.redis.zrange(keys.QUEUE_NAME, 0, -1)
    return sorted(j.decode().removeprefix(prefix) for j in queued if j.decode().startswith(prefix))


async def test_a_swept_fake_generation_is_continued_exactly_under_the_next_ids(
    log: GenerationLog,
) -> None:
    state = fake_state()
    await lost_after(log, state, 12)

    assert await sweeper(log).sweep_once(now=now_ms() + LATER) == []  # handed over, not ended
    pending = await log.get(state.id)
    assert pending.status is Status.RUNNING
    assert (pending.handover_reason, pending.continuations) == ("worker_lost", 0)
    assert await queued_continuations(log, state.id) == ["1.1"]

    assert await continue_job(log, state.id, 1) == "completed"

    events = await events_of(log, state.id)
    check_log(events)
    assert token_text(events) == uninterrupted()
    (seam,) = [e for e in events if e.type is EventType.RESUMED]
    assert seam.seq == 4
    # Attempts: the lost writer 1, the sweep 2, the hand-over 3, the continuation 4.
    assert seam.data == {"attempt": 4, "after_event_id": 3, "reason": "worker_lost"}
    assert [e.type for e in events[:4]] == [
        EventType.METADATA,
        EventType.TOKEN,
        EventType.TOKEN,
        EventType.RESUMED,
    ]
    assert events[-1].data["usage"]["completion_tokens"] == MAX_TOKENS
    final = await log.get(state.id)
    assert (final.status, final.continuations, final.handover_reason) == (
        Status.COMPLETED,
        1,
        None,
    )
    assert final.to_api()["handover"] is None
    assert final.text == uninterrupted()


async def test_only_the_pending_continuations_job_may_claim(log: GenerationLog) -> None:
    state = fake_state()
    dead = await lost_after(log, state, 6)
    await sweeper(log).sweep_once(now=now_ms() + LATER)

    # arq running the first job again, or a copy of a later number: refused, nothing written.
    assert await continue_job(log, state.id, 0) == "skipped"
    assert await continue_job(log, state.id, 2) == "skipped"
    assert len(await events_of(log, state.id)) == 3
    assert await continue_job(log, state.id, 1) == "completed"
    # Once it ran, its copy is refused too: no continuation is pending.
    assert await continue_job(log, state.id, 1) == "skipped"

    with pytest.raises(StaleWriter):
        await dead.append(Event(EventType.TOKEN, {"text": " late", "tokens": 1}))
    assert token_text(await events_of(log, state.id)) == uninterrupted()


async def test_a_continuation_job_with_nothing_pending_is_refused(log: GenerationLog) -> None:
    state = fake_state()
    await log.create(state)
    assert await continue_job(log, state.id, 1) == "skipped"
    assert (await log.get(state.id)).status is Status.QUEUED


async def test_a_cancel_during_the_hand_over_ends_it_cancelled(log: GenerationLog) -> None:
    state = fake_state()
    await lost_after(log, state, 6)
    await sweeper(log).sweep_once(now=now_ms() + LATER)
    await log.request_cancel(state.id)

    assert await continue_job(log, state.id, 1) == "cancelled"

    events = await events_of(log, state.id)
    check_log(events)
    assert [e.type for e in events if e.type is EventType.RESUMED] == []
    assert events[-1].data["finish_reason"] == "cancelled"


async def test_a_cancel_before_the_sweep_wins_over_continuing(log: GenerationLog) -> None:
    state = fake_state()
    await lost_after(log, state, 6)
    await log.request_cancel(state.id)

    assert await sweeper(log).sweep_once(now=now_ms() + LATER) == [state.id]
    assert await queued_continuations(log, state.id) == []
    assert (await log.get(state.id)).status is Status.CANCELLED
    # The done event counts what readers already have, as a worker's cancel would.
    assert (await events_of(log, state.id))[-1].data["usage"]["completion_tokens"] == 6


async def test_a_cancel_while_the_continuation_waits_ends_it_at_once(log: GenerationLog) -> None:
    """The api's cancel of a generation whose continuation no worker has started (none may be
    running): ended right after what was written, with its tokens as usage, not counted as a
    continuation, and the continuation's job, when it comes, finds it ended."""
    state = fake_state()
    await lost_after(log, state, 6)
    await sweeper(log).sweep_once(now=now_ms() + LATER)
    await log.request_cancel(state.id)
    pending = (await log.get(state.id)).pending_continuation
    assert pending == 1

    assert await log.cancel_queued(state.id, continuation=pending)

    final = await log.get(state.id)
    assert final.status is Status.CANCELLED
    assert final.continuations == 0
    assert final.pending_continuation is None
    events = await events_of(log, state.id)
    check_log(events)
    assert [e.type for e in events].count(EventType.DONE) == 1
    assert events[-1].data["usage"]["completion_tokens"] == 6
    assert await continue_job(log, state.id, 1) == "skipped"


async def test_the_first_job_run_again_cannot_fence_a_running_continuation(
    log: GenerationLog,
) -> None:
    """arq runs a killed worker's job again once its in-progress key expires: by then a
    continuation may be writing, and must not be fenced by it."""
    state = fake_state()
    await lost_after(log, state, 6)
    await sweeper(log).sweep_once(now=now_ms() + LATER)
    claim = await log.claim(state.id, worker="w-2", lease_seconds=LEASE, continuation=1)

    with pytest.raises(ClaimRefused):
        await log.claim(state.id, worker="w-3", lease_seconds=LEASE)

    await log.writer(state.id, claim, lease_seconds=LEASE).append(
        Event(EventType.TOKEN, {"text": " more", "tokens": 1})
    )


async def test_past_the_limit_the_sweep_ends_it_with_worker_lost(log: GenerationLog) -> None:
    state = fake_state()
    await lost_after(log, state, 6)
    sweep = sweeper(log, limit=1)
    await sweep.sweep_once(now=now_ms() + LATER)
    # The continuation claims, writes a little, and is lost too.
    claim = await log.claim(state.id, worker="w-2", lease_seconds=LEASE, continuation=1)
    assert claim.continuations == 1
    await log.writer(state.id, claim, lease_seconds=LEASE).append(
        Event(EventType.TOKEN, {"text": " more", "tokens": 1})
    )

    assert await sweep.sweep_once(now=now_ms() + 2 * LATER) == [state.id]

    final = await log.get(state.id)
    assert final.status is Status.FAILED
    assert final.error is not None
    assert final.error["code"] == "worker_lost"
    assert "BROKER_MAX_CONTINUATIONS" in final.error["message"]
    assert await queued_continuations(log, state.id) == ["1.1"]  # only the first was queued


async def test_with_no_continuations_allowed_the_sweep_ends_it_as_before(
    log: GenerationLog,
) -> None:
    state = fake_state()
    await lost_after(log, state, 6)
    assert await sweeper(log, limit=0).sweep_once(now=now_ms() + LATER) == [state.id]
    final = await log.get(state.id)
    assert final.error is not None
    assert final.error["code"] == "worker_lost"


async def test_a_route_that_does_not_continue_ends_it_as_before(log: GenerationLog) -> None:
    state = fake_state()
    await lost_after(log, state, 6)
    off = (Route("fake", "fake", Continuation.OFF),)
    assert await sweeper(log, routes=off).sweep_once(now=now_ms() + LATER) == [state.id]
    assert await queued_continuations(log, state.id) == []
    final = await log.get(state.id)
    assert final.error is not None
    assert final.error["code"] == "worker_lost"


async def test_a_job_that_finds_a_lost_writers_events_continues_them_without_a_sweep(
    log: GenerationLog,
) -> None:
    """arq ran the first job again before any sweep: it continues the stream as well."""
    state = fake_state()
    await lost_after(log, state, 10)
    assert await continue_job(log, state.id, 0) == "completed"
    events = await events_of(log, state.id)
    check_log(events)
    assert token_text(events) == uninterrupted()
    assert [e.data["reason"] for e in events if e.type is EventType.RESUMED] == ["worker_lost"]
    assert (await log.get(state.id)).continuations == 1


async def test_an_interrupted_tool_call_is_not_continued(log: GenerationLog) -> None:
    state = fake_state()
    writer = await lost_after(log, state, 4)
    await writer.append(
        Event(EventType.TOOL_CALL, {"index": 0, "id": "c1", "name": "f", "arguments": '{"a'})
    )
    await sweeper(log).sweep_once(now=now_ms() + LATER)

    assert await continue_job(log, state.id, 1) == "worker_lost"

    events = await events_of(log, state.id)
    check_log(events)
    assert events[-1].data["code"] == "worker_lost"
    assert "tool call" in events[-1].data["message"]
    assert token_text(events) == uninterrupted()[: len(token_text(events))]


async def test_an_unclaimed_hand_over_is_queued_again_under_the_same_number(
    log: GenerationLog,
) -> None:
    state = fake_state()
    await lost_after(log, state, 6)
    sweep = sweeper(log)
    await sweep.sweep_once(now=now_ms() + LATER)
    await log.redis.zrem(keys.QUEUE_NAME, keys.continuation_job_id(state.id, 1))  # a lost job

    # Past the pickup deadline: swept again, its job queued again under a fresh id (arq may
    # hold the first one), still continuation 1.
    await sweep.sweep_once(now=now_ms() + 3 * LATER)

    assert await queued_continuations(log, state.id) == ["1.2"]
    again = await log.get(state.id)
    assert (again.status, again.continuations, again.handover_reason) == (
        Status.RUNNING,
        0,
        "worker_lost",
    )
    assert await continue_job(log, state.id, 1) == "completed"
    assert (await log.get(state.id)).continuations == 1


async def test_a_stopping_worker_hands_over_and_the_next_one_continues_exactly(
    log: GenerationLog,
) -> None:
    state = fake_state(tokens_per_second=200)
    await log.create(state)
    runtime = WorkerRuntime(
        log=log,
        providers=fake_providers(),
        settings=settings(),
        worker_id="w-stopping",  # type: ignore[arg-type]
    )
    first = asyncio.create_task(job(log, fake_providers(), state.id, runtime=runtime).run())
    await wait_for_log(log, state.id, lambda events: len(token_text(events).split()) >= 5)

    runtime.stop()

    assert await finish(first) == "handed_over"
    assert not runtime.relays
    handed = await log.get(state.id)
    assert (handed.status, handed.handover_reason) == (Status.RUNNING, "worker_stopped")
    assert await queued_continuations(log, state.id) == ["1.1"]
    assert await continue_job(log, state.id, 1) == "completed"
    events = await events_of(log, state.id)
    check_log(events)
    assert token_text(events) == uninterrupted()
    (seam,) = [e for e in events if e.type is EventType.RESUMED]
    assert seam.data["reason"] == "worker_stopped"
    assert seam.data["after_event_id"] == seam.seq - 1


async def test_a_stopping_worker_ends_what_its_route_does_not_continue(
    log: GenerationLog,
) -> None:
    state = fake_state(tokens_per_second=200)
    await log.create(state)
    config = settings(routes=(Route("fake", "fake", Continuation.OFF),))
    runtime = WorkerRuntime(log=log, providers=fake_providers(), settings=config, worker_id="w")  # type: ignore[arg-type]
    first = asyncio.create_task(job(log, fake_providers(), state.id, runtime=runtime).run())
    await wait_for_log(log, state.id, lambda events: len(events) >= 2)

    runtime.stop()

    assert await finish(first) == "worker_stopped"
    events = await events_of(log, state.id)
    check_log(events)
    assert events[-1].data["code"] == "worker_stopped"
    assert await queued_continuations(log, state.id) == []


async def test_a_continuation_is_given_the_answer_so_far_and_usage_adds_it_up(
    log: GenerationLog,
) -> None:
    state = dataclasses.replace(fake_state(), model="vllm-x")
    await lost_after(log, state, 6)
    routes = (Route("vllm-*", "openai", Continuation.CONTINUE_FINAL_MESSAGE),)
    await sweeper(log, routes=routes).sweep_once(now=now_ms() + LATER)
    provider = ScriptedProvider(
        [
            *deltas(" and the rest"),
            Finish("stop"),
            Usage(prompt_tokens=20, completion_tokens=3, total_tokens=23),
        ]
    )

    ended = await continue_job(log, state.id, 1, StandInProviders(provider), routes=routes)

    assert ended == "completed"
    (resume,) = provider.resumes
    assert resume is not None
    assert (resume.text, resume.tokens, resume.mode) == (
        "".join(fake_tokens(MESSAGES, MAX_TOKENS, 7)[:6]),
        6,
        Continuation.CONTINUE_FINAL_MESSAGE,
    )
    events = await events_of(log, state.id)
    assert events[-1].data["usage"] == {
        "prompt_tokens": 20,
        "completion_tokens": 6 + 3,
        "total_tokens": 23 + 6,
    }
    assert token_text(events).endswith(" and the rest")


async def test_claims_report_the_continuation_count(log: GenerationLog) -> None:
    state = fake_state()
    await log.create(state)
    first: Claim = await log.claim(state.id, worker="w", lease_seconds=LEASE)
    assert (first.continuations, first.reason) == (0, "")


async def test_the_api_ends_a_waiting_continuation_it_cancels(log: GenerationLog) -> None:
    state = fake_state()
    await lost_after(log, state, 6)
    await sweeper(log).sweep_once(now=now_ms() + LATER)
    pending = await log.get(state.id)
    assert pending.pending_continuation == 1
    await log.request_cancel(state.id)

    assert await log.cancel_queued(state.id, continuation=1) is True

    events = await events_of(log, state.id)
    check_log(events)
    assert events[-1].data["finish_reason"] == "cancelled"
    assert await continue_job(log, state.id, 1) == "skipped"  # its job finds it ended


async def test_the_writer_that_hands_over_is_fenced(log: GenerationLog) -> None:
    state = fake_state()
    await log.create(state)
    claim = await log.claim(state.id, worker="w-stopping", lease_seconds=LEASE)
    writer = log.writer(state.id, claim, lease_seconds=LEASE)
    await writer.append(Event(EventType.METADATA, {"model": "fake"}))

    handed = await log.hand_over(
        state.id, claim.attempt, reason="worker_stopped", max_continuations=2
    )

    assert (handed.outcome, handed.number, handed.new, handed.job_queued) == (
        "queued",
        1,
        True,
        True,
    )
    # A second signal cancelling the job after this step would append worker_stopped: fenced.
    with pytest.raises(StaleWriter):
        await writer.append(Event(EventType.TOKEN, {"text": "late", "tokens": 1}))
    assert len(await events_of(log, state.id)) == 1


async def test_a_hand_over_whose_job_could_not_be_queued_is_left_for_the_sweeper(
    log: GenerationLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: a failure to queue the job after the hand-over landed ended the stream with
    store_unavailable; the continuation is the generation's future whatever happens."""
    state = fake_state(tokens_per_second=200)
    await log.create(state)
    runtime = WorkerRuntime(
        log=log,
        providers=fake_providers(),  # type: ignore[arg-type]
        settings=settings(),
        worker_id="w-stopping",
    )
    first = asyncio.create_task(job(log, fake_providers(), state.id, runtime=runtime).run())
    await wait_for_log(log, state.id, lambda events: len(events) >= 3)

    async def queue_fails(*args: object, **kwargs: object) -> None:
        raise StoreUnavailable("the control slot is failing over")

    monkeypatch.setattr(jobs, "queue_continuation", queue_fails)
    runtime.stop()
    assert await finish(first) == "handed_over"
    monkeypatch.undo()

    pending = await log.get(state.id)
    assert (pending.status, pending.pending_continuation) == (Status.RUNNING, 1)
    assert await queued_continuations(log, state.id) == []
    # The sweep at the pickup deadline queues it again, and it completes exactly.
    await sweeper(log).sweep_once(now=now_ms() + LATER)
    assert await queued_continuations(log, state.id) == ["1.2"]
    assert await continue_job(log, state.id, 1) == "completed"
    events = await events_of(log, state.id)
    check_log(events)
    assert token_text(events) == uninterrupted()


async def test_graceful_stops_do_not_count_against_the_limit(log: GenerationLog) -> None:
    """A rolling deploy may hand one answer over many times: only lost workers count."""
    state = fake_state()
    await lost_after(log, state, 4)
    number = 0  # the first job, run again by arq: it continues the lost writer's events
    for _ in range(3):
        claim = await log.claim(state.id, worker="w", lease_seconds=LEASE, continuation=number)
        assert claim.lost_continuations == 1  # the first loss; the stops do not count
        handed = await log.hand_over(
            state.id, claim.attempt, reason="worker_stopped", max_continuations=1
        )
        assert (handed.outcome, handed.number) == ("queued", number + 1 if number else 2)
        number = handed.number
    assert await continue_job(log, state.id, number, max_continuations=1) == "completed"
    final = await log.get(state.id)
    assert (final.continuations, final.status) == (4, Status.COMPLETED)
    assert token_text(await events_of(log, state.id)) == uninterrupted()


async def test_a_cancel_at_the_seam_reports_the_tokens_already_streamed(
    log: GenerationLog,
) -> None:
    state = fake_state()
    await lost_after(log, state, 6)
    await sweeper(log).sweep_once(now=now_ms() + LATER)
    await log.request_cancel(state.id)

    assert await continue_job(log, state.id, 1) == "cancelled"

    usage = (await events_of(log, state.id))[-1].data["usage"]
    assert usage == {"prompt_tokens": 0, "completion_tokens": 6, "total_tokens": 6}


async def test_a_sweep_counts_a_hand_over_once_and_an_expiry_as_a_queue_timeout(
    log: GenerationLog,
) -> None:
    state = fake_state()
    await lost_after(log, state, 4)
    queued = metrics.HANDOVERS.labels("worker_lost", "queued")
    lost = metrics.WORKERS_LOST
    takeovers = metrics.LEASE_TAKEOVERS.labels("queue_timeout")
    before = (queued._value.get(), lost._value.get(), takeovers._value.get())
    sweep = sweeper(log)
    await sweep.sweep_once(now=now_ms() + LATER)
    await sweep.sweep_once(now=now_ms() + 3 * LATER)  # queued again: not a second hand-over
    assert queued._value.get() == before[0] + 1

    # Long past the give-up time (the queue timeout) after the hand-over: ended.
    await log.redis.hset(keys.meta_key(state.id), "handover_since_ms", 1)
    assert await sweep.sweep_once(now=now_ms() + 5 * LATER) == [state.id]

    final = await log.get(state.id)
    assert final.error is not None
    assert final.error["code"] == "queue_timeout"
    assert (lost._value.get(), takeovers._value.get()) == (before[1], before[2] + 1)
