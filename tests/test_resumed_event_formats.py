"""The ``resumed`` event (the seam where a new attempt continues a generation) in every wire
format and client, without processes: the broker's own frames pass it through with its id;
OpenAI's chunks send nothing for it and their ids go on; the AI SDK's UI message stream sends
a transient ``data-resumed`` and keeps the text part open across it; the Python and browser
clients report it without ending the watch or touching the text; an archive import accepts it
and names what is wrong with a malformed one.

In each, the text before and after the seam must concatenate to the whole answer."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import AsyncGenerator, Callable
from typing import Any

import httpx
import pytest

from api.ai_sdk_format import UIMessageChunks
from api.openai_format import Completion, OpenAIChunks
from api.resume import ResumePoint
from api.sse import encode_event
from api.transcode import ChunkEncoder, transcode
from api.watch import coalesce_tokens
from broker import events
from broker.archive_format import ArchiveError, Checker, read_event, read_header
from broker.archive_schema import payload_problem
from broker.client import AsyncClient, Backoff, Done, Resumed, Token
from broker.client.events import parse_event
from broker.client.sse import SSEDecoder
from broker.events import Event, EventType
from tests.support import archives
from tests.support.node import NODE_DIR, node_or_skip
from tests.support.sse import merged_text_deltas

pytestmark = pytest.mark.anyio

#: The seam's payload: attempt 2 goes on after event 3, the last attempt 1 wrote.
SEAM: dict[str, Any] = {"attempt": 2, "after_event_id": 3, "reason": "worker_stopped"}

#: A generation continued once: attempt 1 wrote "Hello", attempt 2 " again" and the end.
EVENTS = [
    Event(EventType.METADATA, {"model": "m", "created_at": "2026-01-01T00:00:00.000Z"}, 1, 1),
    Event(EventType.TOKEN, {"text": "Hel", "tokens": 1}, 2, 2),
    Event(EventType.TOKEN, {"text": "lo", "tokens": 1}, 3, 3),
    events.resumed(attempt=2, after_event_id=3, reason="worker_stopped", t=40).with_seq(4),
    Event(EventType.TOKEN, {"text": " again", "tokens": 1}, 41, 5),
    Event(EventType.DONE, {"finish_reason": "stop", "usage": events.NO_USAGE}, 42, 6),
]
ANSWER = "Hello again"


def openai_encoder() -> OpenAIChunks:
    return OpenAIChunks("s1", "m", 100, include_usage=True)


def ai_sdk_encoder() -> UIMessageChunks:
    return UIMessageChunks("s1")


ENCODERS: dict[str, Callable[[], ChunkEncoder]] = {
    "openai": openai_encoder,
    "ai-sdk": ai_sdk_encoder,
}


async def broker_frames(sent: list[Event]) -> AsyncGenerator[bytes, None]:
    for event in sent:
        yield encode_event(event)


async def wire(
    encoder: ChunkEncoder, resume: ResumePoint | None = None, *, coalesce: bool = False
) -> bytes:
    """What a client resuming at ``resume`` receives, the encoder brought to that point as the
    api does; ``coalesce``: the later events as a catching-up reader gets them."""
    resume = resume or ResumePoint()
    encoder.replay(e for e in EVENTS if e.seq <= resume.after)
    later = [e for e in EVENTS if e.seq > resume.after]
    sent = coalesce_tokens(later) if coalesce else later
    frames = transcode(broker_frames(sent), encoder, resume)
    return b"".join([chunk async for chunk in frames])


def decode(data: bytes) -> list[tuple[str | None, str]]:
    return [(f.id, f.data) for f in SSEDecoder().feed(data)]


def resume_points(received: list[tuple[str | None, str]]) -> list[tuple[int, ResumePoint]]:
    """Every frame but the last one as a place to resume after: (its position, the point)."""
    points = []
    for position, (frame_id, _) in enumerate(received[:-1]):
        assert frame_id is not None
        after, _, skip = frame_id.partition(".")
        points.append((position, ResumePoint(int(after), int(skip or 0))))
    return points


# ------------------------------------------------------------------- the broker's format


def test_the_broker_format_sends_the_seam_as_an_event_with_its_id() -> None:
    frame = encode_event(EVENTS[3]).decode()
    assert frame.split("\n") == [
        "event: resumed",
        'data: {"attempt":2,"after_event_id":3,"reason":"worker_stopped","t":40}',
        "id: 4",
        "",
        "",
    ]
    received = SSEDecoder().feed(b"".join(encode_event(e) for e in EVENTS))
    assert [(f.id, f.event) for f in received] == [
        ("1", "metadata"),
        ("2", "token"),
        ("3", "token"),
        ("4", "resumed"),
        ("5", "token"),
        ("6", "done"),
    ]


def test_a_catching_up_reader_never_merges_tokens_across_the_seam() -> None:
    merged = coalesce_tokens(EVENTS)
    assert [(e.seq, e.type) for e in merged] == [
        (1, EventType.METADATA),
        (3, EventType.TOKEN),
        (4, EventType.RESUMED),
        (5, EventType.TOKEN),
        (6, EventType.DONE),
    ]
    assert merged[1].data["text"] == "Hello"
    assert "".join(e.data["text"] for e in merged if e.type is EventType.TOKEN) == ANSWER


# ----------------------------------------------------------------------------- openai


async def test_openai_sends_nothing_for_the_seam_and_its_ids_go_on() -> None:
    received = decode(await wire(openai_encoder()))
    assert [frame_id for frame_id, _ in received] == ["1", "2", "3", "5", "5.1", "5.2", "6"]
    chunks = [json.loads(data) for _, data in received[:-1]]
    assert [chunk["event_id"] for chunk in chunks] == [frame_id for frame_id, _ in received[:-1]]
    assert not any("resumed" in data or "worker_stopped" in data for _, data in received)
    deltas = [c["choices"][0]["delta"] for c in chunks if c.get("choices")]
    assert "".join(d.get("content") or "" for d in deltas) == ANSWER
    assert received[-1] == ("6", "[DONE]")


def test_openai_without_streaming_folds_the_whole_answer() -> None:
    completion = Completion("s1", "m", 100)
    for event in EVENTS:
        completion.add(event.type.value, event.data)
    body = completion.body()
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert body["choices"][0]["finish_reason"] == "stop"


# ----------------------------------------------------------------------------- ai-sdk


async def test_ai_sdk_keeps_one_text_part_across_the_seam() -> None:
    received = decode(await wire(ai_sdk_encoder()))
    assert received[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in received[:-1]]
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-delta",
        "data-resumed",
        "text-delta",
        "text-end",
        "finish-step",
        "finish",
    ]
    seam = chunks[5]
    assert seam == {"type": "data-resumed", "data": SEAM, "transient": True}
    assert received[5][0] == "4"  # the seam's frame carries the event's id
    text = [c for c in chunks if c["type"].startswith("text-")]
    assert {c["id"] for c in text} == {"text-0"}
    assert "".join(c.get("delta", "") for c in text) == ANSWER


@pytest.mark.parametrize("fmt", ENCODERS)
async def test_a_resume_after_any_frame_around_the_seam_sends_exactly_the_rest(fmt: str) -> None:
    whole = decode(await wire(ENCODERS[fmt]()))
    for position, resume in resume_points(whole):
        resumed = decode(await wire(ENCODERS[fmt](), resume))
        if fmt == "openai":
            lead_id, _ = resumed.pop(0)  # the role chunk a resumed OpenAI stream opens with
            assert lead_id is None
        assert resumed == whole[position + 1 :], str(resume)


async def test_ai_sdk_catching_up_with_merged_tokens_keeps_the_part_across_the_seam() -> None:
    """A slow reader's catch-up merges tokens (never across the seam): what it gets after any
    frame continues the same text part a live reader has."""
    whole = decode(await wire(ai_sdk_encoder()))
    for position, resume in resume_points(whole):
        resumed = decode(await wire(ai_sdk_encoder(), resume, coalesce=True))
        caught_up = merged_text_deltas(whole[: position + 1] + resumed)
        assert caught_up == merged_text_deltas(whole), str(resume)


async def test_ai_sdk_resumed_at_the_seam_goes_on_in_the_open_text_part() -> None:
    """A reader whose last id is the seam (it had "Hello" and the ``data-resumed``) gets the
    rest of the same part, not a new one."""
    resumed = decode(await wire(ai_sdk_encoder(), ResumePoint(4)))
    chunks = [json.loads(data) for _, data in resumed[:-1]]
    assert chunks[0] == {"type": "text-delta", "id": "text-0", "delta": " again"}
    assert chunks[1] == {"type": "text-end", "id": "text-0"}


# --------------------------------------------------------------------------- the clients


def test_the_python_client_types_the_seam_and_it_ends_nothing() -> None:
    event = parse_event(4, "resumed", json.dumps({**SEAM, "t": 40}))
    assert isinstance(event, Resumed)
    assert (event.attempt, event.after_event_id, event.reason) == (2, 3, "worker_stopped")
    assert (event.id, event.t) == (4, 40)
    assert not event.terminal


async def test_the_python_client_watch_goes_on_past_the_seam_with_the_whole_text() -> None:
    """The connection drops just after the seam: the watch resumes from it (the seam is not an
    end) and the tokens on both sides are the answer."""
    wire_bytes = [b"".join(encode_event(e) for e in EVENTS[:4]), encode_event(EVENTS[4])]
    wire_bytes[1] += encode_event(EVENTS[5])
    asked: list[str | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("last-event-id"))
        body = wire_bytes[len(asked) - 1]
        return httpx.Response(200, content=body, headers={"x-heartbeat-seconds": "5"})

    transport = httpx.MockTransport(handle)
    backoff = Backoff(initial=0.001, maximum=0.01)
    async with AsyncClient("http://broker.test", transport=transport, backoff=backoff) as sb:
        got = [event async for event in sb.watch("s1")]
    assert [e.id for e in got] == [1, 2, 3, 4, 5, 6]
    assert asked == [None, "4"]
    assert isinstance(got[3], Resumed)
    assert isinstance(got[-1], Done)
    assert "".join(e.text for e in got if isinstance(e, Token)) == ANSWER


def run_node(case: str, stdin: str) -> dict[str, Any]:
    """``tests/clients/node/resumed-seam.mjs <case>`` with the pinned Node: what it observed."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    done = subprocess.run(
        [str(node_or_skip()), "resumed-seam.mjs", case],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=NODE_DIR,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def test_the_ai_sdk_reads_the_seam_as_one_text_part() -> None:
    """``ai``'s own schema accepts every chunk, ``data-resumed`` included, and its
    ``readUIMessageStream`` makes one text part of the whole answer (a transient part is
    not kept in the message)."""
    got = run_node("ai-sdk", (await wire(ai_sdk_encoder())).decode())
    assert got["invalid"] == []
    assert got["errors"] == []
    assert got["data_chunks"] == [{"type": "data-resumed", "data": SEAM, "transient": True}]
    texts = [p for p in got["parts"] if p["type"] == "text"]
    assert [(p["text"], p.get("state")) for p in texts] == [(ANSWER, "done")]
    assert not any(p["type"].startswith("data-") for p in got["parts"])


def test_the_browser_client_reports_the_seam_between_the_texts_and_goes_on() -> None:
    sent = [{"id": e.seq, "type": e.type.value, "data": {**e.data, "t": e.t}} for e in EVENTS]
    got = run_node("browser-client", json.dumps(sent))
    assert got["calls"] == [
        ["metadata", 1],
        ["token", "Hello", 3],  # the text before the seam is delivered before it
        ["resumed", {**SEAM, "t": 40}, 4, False, "open"],
        ["token", " again", 5],
        ["done", "stop", 6],
    ]
    assert got["last_event_id"] == 6
    assert got["ended"] is True
    assert got["connections"] == 1
    assert got["stats"] == {"events": 6, "token_events": 3}


# ---------------------------------------------------------------------------- archives


def test_the_archive_schema_accepts_the_seam_and_names_what_is_wrong() -> None:
    assert payload_problem(EventType.RESUMED, EVENTS[3].data) is None
    assert payload_problem(EventType.RESUMED, {**SEAM, "reason": "worker_lost"}) is None
    malformed = {
        "missing": ({k: v for k, v in SEAM.items() if k != "reason"}, "reason"),
        "a string attempt": ({**SEAM, "attempt": "2"}, "attempt"),
        "a flag for a count": ({**SEAM, "after_event_id": True}, "after_event_id"),
        "negative": ({**SEAM, "after_event_id": -1}, "after_event_id"),
        "a null reason": ({**SEAM, "reason": None}, "reason"),
        "text on the seam": ({**SEAM, "text": "x"}, "text"),
        "reserved": ({**SEAM, "t": 4}, "t"),
    }
    for case, (data, field) in malformed.items():
        problem = payload_problem(EventType.RESUMED, data)
        assert problem is not None, case
        assert problem[0] == field, case
    assert payload_problem(EventType.RESUMED, [SEAM]) == ("", "expected an object")


def test_an_archive_with_a_seam_imports_and_a_malformed_seam_is_named() -> None:
    rows = archives.build(["Hel", "lo", " again"], progress=False)
    header, body = rows[0], rows[1:]
    # The seam after attempt 1's last event (the second token), the ids renumbered after it.
    seam = {"id": 4, "event": "resumed", "t": 25, "data": SEAM}
    body = [*body[:3], seam, *({**row, "id": row["id"] + 1} for row in body[3:])]
    header["meta"] = {**header["meta"], "last_seq": str(len(body)), "attempt": "2"}
    header["meta"]["continuations"] = "1"

    def check(lines: archives.Rows) -> None:
        text = archives.dumps(lines).removesuffix("\n").split("\n")
        checker = Checker(read_header(text[0], 1))
        for number, line in enumerate(text[1:], start=2):
            checker.add(line, number)
        checker.finish()

    check([header, *body])  # the token texts around the seam are the header's text
    assert read_event(json.dumps(seam), 5, 4) == Event(EventType.RESUMED, SEAM, t=25, seq=4)
    with pytest.raises(ArchiveError, match=r"^line 5: data\.after_event_id: expected"):
        check(archives.changed([header, *body], 4, "data.after_event_id", "3"))
    with pytest.raises(ArchiveError, match=r"^line 5: data\.text: not a field of a resumed"):
        check(archives.changed([header, *body], 4, "data.text", "x"))
