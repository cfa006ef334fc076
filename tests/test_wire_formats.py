"""The wire formats without processes: the broker's frames, OpenAI's chunks and the AI SDK's
UI message stream, as bytes and as a standard SSE decoder sees them; and, for every frame a
connection could be cut after, a resume that sends exactly the frames that follow it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import pytest
from starlette.types import Message

from api.ai_sdk_format import UIMessageChunks
from api.openai_format import OpenAIChunks
from api.resume import ResumePoint
from api.sse import PING, EventStreamResponse, encode_event
from api.transcode import ChunkEncoder, transcode
from api.watch import coalesce_tokens
from broker.client.sse import SSEDecoder
from broker.events import Event, EventType
from tests.support.sse import merged_text_deltas

pytestmark = pytest.mark.anyio

#: A generation with everything a format must carry: text, a progress report, two tool
#: calls streamed in pieces, text again, and the end with usage.
EVENTS = [
    Event(EventType.METADATA, {"model": "m", "created_at": "2026-01-01T00:00:00.000Z"}, 1, 1),
    Event(EventType.TOKEN, {"text": "Hel", "tokens": 1}, 2, 2),
    Event(EventType.TOKEN, {"text": "lo", "tokens": 1}, 3, 3),
    Event(EventType.PROGRESS, {"tokens": 2, "tokens_per_second": 1.0}, 4, 4),
    Event(EventType.TOOL_CALL, {"index": 0, "id": "c1", "name": "f", "arguments": '{"a'}, 5, 5),
    Event(EventType.TOOL_CALL, {"index": 0, "arguments": '":1}'}, 6, 6),
    Event(EventType.TOOL_CALL, {"index": 1, "id": "c2", "name": "g", "arguments": "{}"}, 7, 7),
    Event(EventType.TOKEN, {"text": " again", "tokens": 1}, 8, 8),
    Event(
        EventType.DONE,
        {"finish_reason": "tool_calls", "usage": {"prompt_tokens": 1, "completion_tokens": 3}},
        9,
        9,
    ),
]


def openai_encoder() -> OpenAIChunks:
    return OpenAIChunks("s1", "m", 100, include_usage=True)


def ai_sdk_encoder() -> UIMessageChunks:
    return UIMessageChunks("s1")


ENCODERS = {"openai": openai_encoder, "ai-sdk": ai_sdk_encoder}


async def broker_frames(events: list[Event], *, ping_first: bool = False) -> AsyncIterator[bytes]:
    if ping_first:
        yield PING
    for event in events:
        yield encode_event(event)


async def wire(encoder: ChunkEncoder, resume: ResumePoint | None = None) -> bytes:
    """What a client resuming at ``resume`` receives: the encoder is brought to that point
    with the events the client has, as the api does, then fed the rest."""
    resume = resume or ResumePoint()
    encoder.replay(e for e in EVENTS if e.seq <= resume.after)
    later = [e for e in EVENTS if e.seq > resume.after]
    frames = transcode(broker_frames(later), encoder, resume)
    return b"".join([chunk async for chunk in frames])


def decode(data: bytes) -> list[tuple[str | None, str]]:
    """(id, data) of each event, as a standard SSE decoder dispatches them."""
    return [(f.id, f.data) for f in SSEDecoder().feed(data)]


def test_a_broker_frame_puts_its_id_line_last() -> None:
    frame = encode_event(EVENTS[1]).decode()
    assert frame.split("\n") == [
        "event: token",
        'data: {"text":"Hel","tokens":1,"t":2}',
        "id: 2",
        "",
        "",
    ]


async def test_retry_is_a_line_of_the_first_event_and_pings_never_form_an_event() -> None:
    response = EventStreamResponse(broker_frames(EVENTS[:2], ping_first=True), retry_ms=2000)
    sent: list[bytes] = []

    async def receive() -> Message:
        await anyio.sleep_forever()  # the client never hangs up
        raise AssertionError

    async def send(message: Message) -> None:
        sent.append(message.get("body", b""))

    await response({"type": "http"}, receive, send)
    data = b"".join(sent)
    # The opening ping (the stream is open), the frames' own ping, then the first event.
    assert data.startswith(b": ping\n: ping\nretry: 2000\nevent: metadata\n")
    assert data.count(b"retry:") == 1
    decoder = SSEDecoder()
    events = decoder.feed(data)
    assert [e.event for e in events] == ["metadata", "token"]  # no empty event anywhere
    assert decoder.retry_ms == 2000
    assert PING == b": ping\n"


@pytest.mark.parametrize("fmt", ENCODERS)
async def test_every_frame_has_an_id_and_ids_increase_as_decimals(fmt: str) -> None:
    received = decode(await wire(ENCODERS[fmt]()))
    ids = [frame_id for frame_id, _ in received]
    assert None not in ids
    assert [float(i) for i in ids] == sorted(float(i) for i in ids)  # type: ignore[arg-type]
    assert len(set(ids)) == len(ids)
    assert ids[-1] == "9"
    assert received[-1][1] == "[DONE]"


async def test_openai_chunks_carry_their_id_and_the_whole_answer() -> None:
    received = decode(await wire(openai_encoder()))
    chunks = [(frame_id, json.loads(data)) for frame_id, data in received if data != "[DONE]"]
    assert all(chunk["event_id"] == frame_id for frame_id, chunk in chunks)
    deltas = [c["choices"][0]["delta"] for _, c in chunks if c.get("choices")]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == "Hello again"
    finish = [c["choices"][0]["finish_reason"] for _, c in chunks if c.get("choices")]
    assert finish[-1] == "tool_calls"
    assert chunks[-1][1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 3}
    # The done event's three frames: <previous>.1, <previous>.2, then the event's own id.
    assert [frame_id for frame_id, _ in received[-3:]] == ["8.1", "8.2", "9"]


async def test_the_ai_sdk_stream_is_the_protocols_chunk_sequence() -> None:
    received = decode(await wire(ai_sdk_encoder()))
    chunks = [json.loads(data) for _, data in received[:-1]]
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-delta",
        "data-progress",
        "text-end",
        "tool-input-start",
        "tool-input-delta",
        "tool-input-delta",
        "tool-input-available",
        "tool-input-start",
        "tool-input-delta",
        "tool-input-available",
        "text-start",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    assert chunks[0] == {
        "type": "start",
        "messageId": "s1",
        "messageMetadata": {"model": "m", "created_at": "2026-01-01T00:00:00.000Z"},
    }
    assert chunks[5]["transient"] is True
    assert [c["id"] for c in chunks if c["type"].startswith("text-")] == ["text-0"] * 4 + [
        "text-1"
    ] * 3
    available = [c for c in chunks if c["type"] == "tool-input-available"]
    assert [(c["toolCallId"], c["toolName"], c["input"]) for c in available] == [
        ("c1", "f", {"a": 1}),
        ("c2", "g", {}),
    ]
    assert chunks[-1]["finishReason"] == "tool-calls"
    assert chunks[-1]["messageMetadata"]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("fmt", ENCODERS)
async def test_a_resume_after_any_frame_sends_exactly_the_frames_after_it(fmt: str) -> None:
    whole = decode(await wire(ENCODERS[fmt]()))
    for position, (frame_id, _) in enumerate(whole[:-1]):
        assert frame_id is not None
        after, _, skip = frame_id.partition(".")
        resume = ResumePoint(int(after), int(skip or 0))
        resumed = decode(await wire(ENCODERS[fmt](), resume))
        if fmt == "openai":
            lead_id, lead = resumed.pop(0)
            assert lead_id is None  # the role chunk does not move the resume point
            assert json.loads(lead)["choices"][0]["delta"]["role"] == "assistant"
            assert json.loads(lead)["event_id"] == frame_id
        assert resumed == whole[position + 1 :], f"resumed after {frame_id}"


async def test_an_unfinished_call_or_text_is_closed_by_an_error() -> None:
    encoder = ai_sdk_encoder()
    encoder.replay(EVENTS[:5])  # a text part ended, the first call streaming
    error = {"code": "provider_error", "message": "boom", "retryable": True}
    chunks = encoder.encode(10, "error", error)
    assert chunks == [
        {"type": "error", "errorText": "boom", "code": "provider_error", "retryable": True},
        "[DONE]",
    ]
    encoder = ai_sdk_encoder()
    encoder.replay(EVENTS[:3])  # text open
    assert encoder.encode(10, "error", error)[0] == {"type": "text-end", "id": "text-0"}


def test_arguments_that_are_not_json_end_as_a_tool_input_error() -> None:
    encoder = ai_sdk_encoder()
    encoder.encode(1, "tool_call", {"index": 0, "id": "c", "name": "f", "arguments": "{oops"})
    chunks = encoder.encode(2, "done", {"finish_reason": "cancelled", "usage": None})
    failed = [c for c in chunks if isinstance(c, dict) and c["type"] == "tool-input-error"]
    assert failed == [
        {
            "type": "tool-input-error",
            "toolCallId": "c",
            "toolName": "f",
            "input": "{oops",
            "errorText": "the tool call's arguments are not JSON",
        }
    ]
    finish = [c for c in chunks if isinstance(c, dict) and c["type"] == "finish"]
    assert finish[0]["finishReason"] == "other"
    assert finish[0]["messageMetadata"]["finish_reason"] == "cancelled"


def test_a_stream_without_metadata_still_starts_the_message() -> None:
    chunks = ai_sdk_encoder().encode(1, "error", {"code": "queue_timeout", "message": "late"})
    assert [c if isinstance(c, str) else c["type"] for c in chunks] == [
        "start",
        "start-step",
        "error",
        "[DONE]",
    ]


async def test_transcoding_is_the_same_whatever_the_reads() -> None:
    native = b"".join(encode_event(e) for e in EVENTS)

    async def pieces(size: int) -> AsyncIterator[bytes]:
        for start in range(0, len(native), size):
            yield native[start : start + size]

    async def run(size: int) -> bytes:
        frames = transcode(pieces(size), openai_encoder(), ResumePoint())  # type: ignore[arg-type]
        return b"".join([chunk async for chunk in frames])

    whole = await run(len(native))
    for size in (1, 7, 64):
        assert await run(size) == whole


async def test_a_resume_that_catches_up_with_merged_tokens_continues_the_same_parts() -> None:
    """A slow reader's catch-up merges consecutive tokens into one event (the last id):
    the text parts it continues or opens must still be the ones a live client would see."""
    events = [
        EVENTS[0],
        *[Event(EventType.TOKEN, {"text": f"w{i} ", "tokens": 1}, i, i) for i in range(2, 8)],
        Event(EventType.TOOL_CALL, {"index": 0, "id": "c", "name": "f", "arguments": "{}"}, 8, 8),
        *[Event(EventType.TOKEN, {"text": f"v{i} ", "tokens": 1}, i, i) for i in range(9, 13)],
        Event(EventType.DONE, {"finish_reason": "stop", "usage": None}, 13, 13),
    ]

    async def received(resume: ResumePoint, coalesce: bool) -> list[tuple[str | None, str]]:
        encoder = ai_sdk_encoder()
        encoder.replay(e for e in events if e.seq <= resume.after)
        later = [e for e in events if e.seq > resume.after]
        frames = transcode(
            broker_frames(coalesce_tokens(later) if coalesce else later), encoder, resume
        )
        return decode(b"".join([chunk async for chunk in frames]))

    whole = await received(ResumePoint(), coalesce=False)
    for position, (frame_id, _) in enumerate(whole[:-1]):
        assert frame_id is not None
        after, _, skip = frame_id.partition(".")
        resumed = await received(ResumePoint(int(after), int(skip or 0)), coalesce=True)
        caught_up = merged_text_deltas(whole[: position + 1] + resumed)
        assert caught_up == merged_text_deltas(whole), frame_id
