"""Events: the msgpack log encoding and the SSE wire frame."""

from __future__ import annotations

import json

import msgpack
import pytest

from api.sse import encode_event
from broker.events import Event, EventType, entry_id, seq_from_entry_id

SAMPLES: dict[EventType, dict[str, object]] = {
    EventType.METADATA: {
        "id": "abc",
        "model": "fake",
        "created_at": "2024-01-02T03:04:05.006Z",
        "attempt": 1,
        "metadata": {"session": "s", "n": 2},
    },
    EventType.TOKEN: {"text": "Hé\nllo 🌍", "tokens": 3},
    EventType.TOOL_CALL: {"index": 0, "id": "call_1", "name": "lookup", "arguments": '{"q":'},
    EventType.PROGRESS: {
        "tokens": 12,
        "tokens_per_second": 41.5,
        "estimated_total": None,
        "percent": None,
        "eta_ms": None,
    },
    EventType.RESUMED: {"attempt": 3, "after_event_id": 41, "reason": "worker_stopped"},
    EventType.ERROR: {"code": "fake_failure", "message": "it failed", "retryable": False},
    EventType.DONE: {
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    },
}


def test_every_event_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(EventType)


@pytest.mark.parametrize("kind", list(EventType))
def test_encode_decode_round_trip(kind: EventType) -> None:
    event = Event(kind, SAMPLES[kind], t=1234)
    decoded = Event.decode(event.encode(), 7)
    assert decoded == event.with_seq(7)
    assert decoded.type is kind
    assert decoded.data == SAMPLES[kind]
    assert decoded.t == 1234
    assert decoded.seq == 7


def test_an_event_without_data_round_trips() -> None:
    event = Event(EventType.DONE)
    assert Event.decode(event.encode(), 1) == Event(EventType.DONE, {}, 0, 1)


def test_the_stored_form_is_one_msgpack_map_with_type_and_t() -> None:
    body = msgpack.unpackb(Event(EventType.TOKEN, {"text": "a", "tokens": 1}, t=5).encode())
    assert body == {"type": "token", "t": 5, "text": "a", "tokens": 1}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"garbage",
        b"\xc1",
        b"\x81\xa4type",
        msgpack.packb([1, 2]),
        msgpack.packb("token"),
        msgpack.packb({"t": 1, "text": "a"}),
        msgpack.packb({"type": "nonsense", "t": 1}),
        msgpack.packb({"type": 5}),
        msgpack.packb({"type": "token", "t": "soon"}),
    ],
)
def test_decode_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any ValueError subclass is the contract
        Event.decode(raw, 1)


def test_terminal_types() -> None:
    assert {k for k in EventType if k.terminal} == {EventType.DONE, EventType.ERROR}
    assert Event(EventType.ERROR).terminal
    assert not Event(EventType.TOKEN).terminal


def test_with_seq_keeps_everything_else() -> None:
    event = Event(EventType.TOKEN, {"text": "x", "tokens": 1}, t=9)
    moved = event.with_seq(42)
    assert (moved.type, moved.data, moved.t, moved.seq) == (event.type, event.data, 9, 42)
    assert event.seq == 0


@pytest.mark.parametrize(
    ("raw", "seq"), [(b"0-17", 17), ("0-1", 1), ("0-9007199254740993", 9007199254740993)]
)
def test_seq_from_entry_id(raw: bytes | str, seq: int) -> None:
    assert seq_from_entry_id(raw) == seq


@pytest.mark.parametrize("seq", [1, 2, 99, 123456789])
def test_entry_id_and_seq_from_entry_id_agree(seq: int) -> None:
    assert seq_from_entry_id(entry_id(seq)) == seq
    assert seq_from_entry_id(entry_id(seq).encode()) == seq


def test_sse_frame_layout() -> None:
    event = Event(EventType.DONE, {"finish_reason": "stop", "usage": None}, t=250, seq=12)
    frame = encode_event(event)
    assert frame.endswith(b"\n\n")
    lines = frame[:-2].split(b"\n")
    assert lines[0] == b"event: done"
    assert lines[1].startswith(b"data: ")
    assert lines[2] == b"id: 12"  # last: a client that records it has the whole event
    assert len(lines) == 3
    assert json.loads(lines[1][len(b"data: ") :]) == {
        "finish_reason": "stop",
        "usage": None,
        "t": 250,
    }


@pytest.mark.parametrize("kind", list(EventType))
def test_every_event_type_is_one_sse_frame(kind: EventType) -> None:
    frame = encode_event(Event(kind, SAMPLES[kind], t=3, seq=4)).decode("utf-8")
    event_line, data_line, id_line, blank, end = frame.split("\n")
    assert (blank, end) == ("", "")
    assert id_line == "id: 4"
    assert event_line == f"event: {kind.value}"
    assert data_line.startswith("data: ")
    assert json.loads(data_line[6:]) == {**SAMPLES[kind], "t": 3}


def test_data_is_one_line_even_when_the_text_has_line_breaks() -> None:
    text = "line one\nline two\r\nthree\rfour\n\n"
    frame = encode_event(Event(EventType.TOKEN, {"text": text, "tokens": 4}, t=1, seq=2))
    body = frame.decode("utf-8")
    # Exactly three field lines and the terminating blank line, whatever SSE line break counts.
    assert body.count("\n") == 4
    assert "\r" not in body
    data_line = body.split("\n")[1]
    assert json.loads(data_line[len("data: ") :])["text"] == text


def test_non_ascii_text_is_kept_as_utf8() -> None:
    text = "naïve 日本語 🌍"
    frame = encode_event(Event(EventType.TOKEN, {"text": text, "tokens": 1}, t=0, seq=1))
    assert text.encode("utf-8") in frame
    assert b"\\u" not in frame


def test_t_is_included_and_the_event_is_not_changed() -> None:
    data = {"text": "a", "tokens": 1}
    encode_event(Event(EventType.TOKEN, data, t=77, seq=1))
    assert data == {"text": "a", "tokens": 1}
