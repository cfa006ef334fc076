"""The events of a generation and their encoding in the log.

An event is what readers receive: a type, a JSON-able payload, the time it was produced and
its sequence number. In Redis each event is one stream entry with id ``0-<seq>`` and a single
field holding a msgpack map ``{"type": ..., "t": ..., **payload}``; ``t`` is milliseconds since
the generation was created, so replays keep the original pacing and pickup latency is visible.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from broker.state import GenerationState, iso_ms


class EventType(enum.StrEnum):
    METADATA = "metadata"
    TOKEN = "token"
    TOOL_CALL = "tool_call"
    PROGRESS = "progress"
    #: The seam where a new attempt continues the answer of one that stopped or was lost.
    RESUMED = "resumed"
    ERROR = "error"
    DONE = "done"

    @property
    def terminal(self) -> bool:
        return self in (EventType.DONE, EventType.ERROR)


#: Keys of a log entry that are the event's own fields, never part of its ``data``.
RESERVED = frozenset({"type", "t"})


@dataclass(frozen=True, slots=True)
class Event:
    type: EventType
    data: dict[str, Any] = field(default_factory=dict)
    #: Milliseconds since the generation was created.
    t: int = 0
    #: Position in the log (1, 2, 3…); 0 until the event has been appended.
    seq: int = 0

    @property
    def terminal(self) -> bool:
        return self.type.terminal

    def encode(self) -> bytes:
        """The msgpack bytes stored in the log entry (``seq`` lives in the entry id).

        ``ValueError`` when ``data`` holds a reserved key (``RESERVED``): it would replace
        the event's own type or time in the entry, and readers would get another event.
        """
        reserved = RESERVED.intersection(self.data)
        if reserved:
            raise ValueError(f"event data may not hold {', '.join(sorted(reserved))}")
        body: dict[str, Any] = {"type": self.type.value, "t": self.t, **self.data}
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, raw: bytes, seq: int) -> Event:
        body = msgpack.unpackb(raw, raw=False)
        if not isinstance(body, dict) or "type" not in body:
            raise ValueError(f"log entry {seq} is not an encoded event")
        kind = EventType(body.pop("type"))
        t = body.pop("t", 0)
        if not isinstance(t, int):
            raise ValueError(f"log entry {seq} has a malformed time {t!r}")
        return cls(type=kind, data=body, t=t, seq=seq)

    def with_seq(self, seq: int) -> Event:
        return Event(type=self.type, data=self.data, t=self.t, seq=seq)


def seq_from_entry_id(entry_id: bytes | str) -> int:
    """``b"0-17"`` → ``17``. Entry ids are written by the broker as ``0-<seq>``."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    _, _, seq = text.partition("-")
    return int(seq)


def entry_id(seq: int) -> str:
    return f"0-{seq}"


# Constructors for the events whose data the broker defines itself (the public shapes of
# docs/http.md, "Event types"), shared by the worker's job and the api (which ends a queued
# generation it cancels).


def metadata(state: GenerationState, *, attempt: int, t: int) -> Event:
    """The first event of every generation: what it is, and which attempt writes it."""
    return Event(
        EventType.METADATA,
        {
            "id": state.id,
            "model": state.model,
            "created_at": iso_ms(state.created_at_ms),
            "attempt": attempt,
            "metadata": state.metadata,
        },
        t=t,
    )


def done(finish_reason: str, usage: dict[str, int], *, t: int) -> Event:
    return Event(EventType.DONE, {"finish_reason": finish_reason, "usage": usage}, t=t)


def error(
    code: str, message: str, *, retryable: bool, t: int, retry_after: float | None = None
) -> Event:
    data: dict[str, Any] = {"code": code, "message": message, "retryable": retryable}
    if retry_after is not None:
        data["retry_after"] = retry_after
    return Event(EventType.ERROR, data, t=t)


def resumed(*, attempt: int, after_event_id: int, reason: str, t: int) -> Event:
    """The seam of a continued generation: attempt ``attempt`` goes on after event
    ``after_event_id``, the last one the attempt before it wrote; ``reason`` is why that
    one stopped (``worker_lost``, ``worker_stopped``). It carries no text."""
    return Event(
        EventType.RESUMED,
        {"attempt": attempt, "after_event_id": after_event_id, "reason": reason},
        t=t,
    )


NO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
