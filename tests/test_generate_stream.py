"""The generate job when all goes well, against fakeredis with a scripted provider: the
metadata first, every token once and in order (the first at once, then in batches), tool
calls as ``tool_call`` events, progress reports that count the tokens so far, and one
``done`` with the provider's finish reason and usage (or what was streamed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker.events import EventType
from broker.generation_log import GenerationLog
from broker.request import GenerationRequest
from broker.state import Status, iso_ms
from tests.support.generation_job import (
    MODEL,
    Call,
    ScriptedProvider,
    StandInProviders,
    Step,
    create,
    deltas,
    ended_as,
    events_of,
    run,
    settings,
    token_count,
    token_text,
    wait_for_log,
)
from workers.providers.base import Finish, TextDelta, ToolCallDelta, Usage

pytestmark = pytest.mark.anyio


STORY = "Once upon a time a broker streamed every token to each reader, exactly once."


async def test_a_generation_streams_its_tokens_and_ends_with_done(log: GenerationLog) -> None:
    state = await create(log, max_tokens=50)
    chunks = deltas(STORY)
    provider = ScriptedProvider([*chunks, Finish("stop"), Usage(4, len(chunks), 4 + len(chunks))])
    providers = StandInProviders(provider)

    events = await ended_as("completed", log, None, state.id, providers=providers)
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

    events = await ended_as("completed", log, provider, state.id, config)
    tokens = [e for e in events if e.type is EventType.TOKEN]
    # A window that never lapses: the first token alone, then full batches, then the rest.
    assert [e.data["tokens"] for e in tokens] == [1, 4, 4, 1]
    assert [e.data["text"] for e in tokens] == ["t0 ", "t1 t2 t3 t4 ", "t5 t6 t7 t8 ", "t9 "]


async def test_without_finish_or_usage_done_counts_the_streamed_tokens(
    log: GenerationLog,
) -> None:
    state = await create(log)
    provider = ScriptedProvider(deltas("just three words"))

    events = await ended_as("completed", log, provider, state.id)
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

    events = await ended_as("completed", log, provider, state.id)
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


async def test_progress_events_report_growing_token_counts(log: GenerationLog) -> None:
    state = await create(log, max_tokens=6)
    steps: list[Step] = []
    for chunk in deltas("a slow model makes progress visible"):
        steps += [Call(lambda: asyncio.sleep(0.02)), chunk]  # pacing of a slow model
    provider = ScriptedProvider([*steps, Finish("stop")])
    config = settings(batch_max_age_ms=0.0, progress_interval_ms=10.0)

    events = await ended_as("completed", log, provider, state.id, config)
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
