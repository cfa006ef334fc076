"""The generate job (``workers/generate.py``) run by a test against a ``GenerationLog`` on
fakeredis (the ``log`` fixture of ``tests/conftest.py``), with a scripted provider the test
controls: text and tool-call chunks, ``Gate``s where the provider waits until the test
releases it, ``Call``s that run a step inside the provider (a takeover, a lost batch), and
exceptions it raises. Also what the tests read back: the log's events, checked for shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest

from broker.events import Event, EventType
from broker.generation_log import GenerationLog
from broker.request import GenerationRequest
from broker.settings import GenerationSettings
from broker.state import GenerationState, Status, new_stream_id, now_ms
from workers.generate import GenerationJob, WorkerRuntime
from workers.providers.base import Chunk, Resume, TextDelta

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
        #: What each call was asked to continue from (None: a first attempt).
        self.resumes: list[Resume | None] = []

    async def stream(
        self, request: GenerationRequest, resume: Resume | None = None
    ) -> AsyncGenerator[Chunk, None]:
        self.calls += 1
        self.requests.append(request)
        self.resumes.append(resume)
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


def settings(**changes: Any) -> GenerationSettings:
    base = {"batch_max_age_ms": 5.0, "progress_interval_ms": 600_000.0, "cancel_poll_ms": 10.0}
    return dataclasses.replace(GenerationSettings(), **{**base, **changes})


async def create(
    log: GenerationLog, *, model: str = MODEL, max_tokens: int | None = None
) -> GenerationState:
    state = new_state(model=model, max_tokens=max_tokens)
    await log.create(state)
    return state


def new_state(*, model: str = MODEL, max_tokens: int | None = None) -> GenerationState:
    """A generation as the api would record it (not recorded yet)."""
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
    return state


def job(
    log: GenerationLog,
    providers: StandInProviders,
    stream_id: str,
    config: GenerationSettings | None = None,
    *,
    enqueued_ms: int = 0,
    continuation: int = 0,
    runtime: WorkerRuntime | None = None,
) -> GenerationJob:
    """The job as arq would run it; ``enqueued_ms``: when its job was queued (0: long ago);
    ``continuation``: the continuation it was queued for (0: the generation's first job)."""
    runtime = runtime or WorkerRuntime(
        log=log,
        providers=providers,  # type: ignore[arg-type]
        settings=config or settings(),
        worker_id="w-test",
    )
    return GenerationJob(runtime, stream_id, enqueued_ms=enqueued_ms, continuation=continuation)


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


async def ended_as(
    outcome: str,
    log: GenerationLog,
    provider: ScriptedProvider | None,
    stream_id: str,
    config: GenerationSettings | None = None,
    providers: StandInProviders | None = None,
) -> list[Event]:
    """Run the job to its end; check that it ended with ``outcome`` and that the log has the
    shape every log must have (``check_log``); the log's events."""
    ended = await run(log, provider, stream_id, config, providers)
    assert ended == outcome, f"the job ended {ended!r}, not {outcome!r}"
    events = await events_of(log, stream_id)
    check_log(events)
    return events


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


async def left_by_a_lost_worker(log: GenerationLog, state: GenerationState) -> None:
    """The generation as a worker that died left it: claimed (attempt 1), its metadata and
    a first token ("Half") appended, and no end."""
    first = await log.claim(state.id, worker="w-dead", lease_seconds=5)
    dead = log.writer(state.id, first, lease_seconds=5)
    await dead.append(
        Event(EventType.METADATA, {"model": MODEL}),
        Event(EventType.TOKEN, {"text": "Half", "tokens": 1}),
    )
