"""A live reader never skips events: when the hub hands it an event past a gap, the gap is
read from the log first, and if the log read comes back short (during a failover the hub's
connection and the pool's may reach different nodes for a moment) the response ends, so
the client resumes from the last event it really has, instead of receiving event 12
without 10 and 11."""

from __future__ import annotations

from typing import Any

import pytest

from api.sse import encode_event
from api.subscription import Frame
from api.watch import Reader
from broker.errors import StoreUnavailable
from broker.events import Event, EventType

pytestmark = pytest.mark.anyio

STREAM = "01m8tp6b0g1r7zmy6md3swnt25"


def token(seq: int) -> Event:
    return Event(EventType.TOKEN, {"text": f"t{seq}", "tokens": 1}, t=seq, seq=seq)


class Log:
    """The log as one node holds it: events 1..``last``."""

    def __init__(self, last: int) -> None:
        self.last = last

    async def read(self, stream_id: str, after_seq: int, *, count: int = 512) -> list[Event]:
        return [token(seq) for seq in range(after_seq + 1, min(self.last, after_seq + count) + 1)]


class OneTake:
    """A subscription that hands over one batch of frames, then nothing more."""

    overflowed = False
    closed = None

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames

    async def take(self, live: object = None) -> list[Frame]:
        frames, self.frames = self.frames, []
        return frames


def frame(seq: int) -> Frame:
    return Frame(seq, encode_event(token(seq)), terminal=False)


async def first_chunk(reader: Reader, subscription: Any) -> bytes:
    async for chunk in reader.follow(subscription):
        return chunk
    raise AssertionError("nothing sent")


async def test_a_gap_is_filled_from_the_log_before_the_frame() -> None:
    reader = Reader(Log(last=12), STREAM, cursor=9)  # type: ignore[arg-type]
    chunk = await first_chunk(reader, OneTake([frame(12)]))
    assert [line for line in chunk.split(b"\n") if line.startswith(b"id:")] == [
        b"id: 10",
        b"id: 11",
        b"id: 12",
    ]
    assert reader.cursor == 12


async def test_a_gap_the_log_cannot_fill_ends_the_response_without_skipping() -> None:
    reader = Reader(Log(last=10), STREAM, cursor=9)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable):
        await first_chunk(reader, OneTake([frame(12)]))
    assert reader.cursor == 9  # nothing sent: the client resumes after 9
