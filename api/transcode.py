"""The broker's events re-framed in another wire format (OpenAI's chunks, the AI SDK's UI
message stream), with resume points that stay exact.

A format is a ``ChunkEncoder``: a state machine fed the stream's events in order, answering
each with the payloads (``data:`` contents) it becomes — none, one or several. ``transcode``
reads the broker's own frames (what a watcher would get: catch-up, live, replay), feeds the
encoder and writes its payloads as SSE frames with ids as ``api.resume`` describes: the last
frame of an event's group carries the event's id, the ones before it ``<previous id>.<k>``.

On a resume, the encoder is first brought to the state it had after the client's last
event (``ChunkEncoder.replay``, fed the log up to that point), so what follows is exactly
what an unbroken connection would have sent from there; ``skip`` then drops the frames of
the next group that the client already has.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import aclosing
from typing import Any, Protocol

from api.resume import ResumePoint
from api.sse import PING, Frames, sse_frame
from broker.events import Event

#: A payload: a JSON object, or a literal ``data:`` text such as ``[DONE]``.
Payload = dict[str, Any] | str


class ChunkEncoder(Protocol):
    #: Whether a payload depends on the events before it; only then does a resume ``replay``
    #: the log up to the client's resume point into a new encoder.
    stateful: bool

    def lead(self, resume: ResumePoint) -> list[Payload]:
        """Payloads to send, without an id, before anything else on this connection."""
        ...

    def encode(self, seq: int, event_type: str, data: dict[str, Any]) -> list[Payload]:
        """The payloads event ``seq`` becomes (its ``data`` includes ``t``)."""
        ...

    def replay(self, events: Iterable[Event]) -> None:
        """Take in events a client already has: the state changes, nothing is sent."""
        ...

    def stamp(self, payload: dict[str, Any], event_id: str) -> dict[str, Any]:
        """The payload as sent under SSE id ``event_id`` (a format may show the id in it)."""
        ...


async def transcode(frames: Frames, encoder: ChunkEncoder, resume: ResumePoint) -> Frames:
    """``frames`` (the broker's own, from ``resume.after``) as ``encoder``'s format.

    Pings pass through as they are. The caller has already replayed the history into the
    encoder (``ChunkEncoder.replay``)."""
    previous = resume.after
    skip = resume.skip
    pending = b""  # the start of a block whose end has not come yet
    async with aclosing(frames):
        lead = encoder.lead(resume)
        if lead:
            yield b"".join(_frame(encoder, p, None) for p in lead)
        async for chunk in frames:
            if chunk == PING and not pending:
                yield chunk
                continue
            whole, _, pending = (pending + chunk).rpartition(b"\n\n")
            out = bytearray()
            for seq, event_type, data in parse_frames(whole):
                payloads = encoder.encode(seq, event_type, data)
                last = len(payloads) - 1
                for k, payload in enumerate(payloads):
                    if k < min(skip, last):
                        continue  # the client has it (sent before the cut)
                    event_id = str(seq) if k == last else f"{previous}.{k + 1}"
                    out += _frame(encoder, payload, event_id)
                if payloads:
                    skip = 0
                previous = seq
            if out:
                yield bytes(out)


def _frame(encoder: ChunkEncoder, payload: Payload, event_id: str | None) -> bytes:
    if isinstance(payload, str):
        return sse_frame(payload, event_id)
    if event_id is not None:
        payload = encoder.stamp(payload, event_id)
    return sse_frame(json.dumps(payload, separators=(",", ":"), ensure_ascii=False), event_id)


def parse_frames(chunk: bytes) -> list[tuple[int, str, dict[str, Any]]]:
    """``(id, event, data)`` of each of the broker's own frames in a chunk of whole blocks
    (``api.sse.encode_event``); comment lines are skipped, and so is a block that is not an
    event."""
    parsed = []
    for block in chunk.split(b"\n\n"):
        fields: dict[bytes, bytes] = {}
        for line in block.split(b"\n"):
            name, _, value = line.partition(b": ")
            fields[name] = value
        if b"id" in fields and b"data" in fields:
            event_type = fields.get(b"event", b"message").decode()
            parsed.append((int(fields[b"id"]), event_type, json.loads(fields[b"data"])))
    return parsed
