"""The typed events a watcher yields: one class per SSE ``event:`` type.

docs/http.md, "Event types", describes each.

Every event keeps its ``id`` (the resume point), ``t`` (ms since the generation was
created) and the decoded ``data`` as sent, so nothing the server adds later is lost to a
client that does not know it yet. An event type this client does not know comes as
``UnknownEvent`` rather than an error: servers may add types, old clients keep working.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class StreamEvent:
    id: int
    type: str
    t: int | None
    data: dict[str, Any] = field(repr=False)

    @property
    def terminal(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class Metadata(StreamEvent):
    model: str
    created_at: str | None


@dataclass(frozen=True, slots=True)
class Token(StreamEvent):
    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class ToolCall(StreamEvent):
    index: int
    call_id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class Progress(StreamEvent):
    tokens: int
    tokens_per_second: float | None
    estimated_total: int | None
    percent: float | None
    eta_ms: int | None


@dataclass(frozen=True, slots=True)
class Resumed(StreamEvent):
    """The seam where a new attempt went on with the answer after its worker was lost or
    stopped (``reason``: ``worker_lost``, ``worker_stopped``). It carries no text and ends
    nothing: the ``Token`` texts before and after it are one answer."""

    attempt: int
    after_event_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Done(StreamEvent):
    finish_reason: str | None
    usage: dict[str, int] | None

    @property
    def terminal(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class StreamFailed(StreamEvent):
    """The ``error`` event: the generation ended without an answer (the model failed, its
    worker was lost, …). Not an exception: it is the stream's last event, like ``Done``."""

    code: str
    message: str
    retryable: bool
    retry_after: float | None

    @property
    def terminal(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class UnknownEvent(StreamEvent):
    pass


def parse_event(event_id: int, event_type: str, raw_data: str) -> StreamEvent:
    """One SSE frame as a typed event; ``ValueError`` when ``data`` is not a JSON object."""
    data = json.loads(raw_data)
    if not isinstance(data, dict):
        raise ValueError(f"event {event_id}: data is not a JSON object")
    common: dict[str, Any] = {"id": event_id, "type": event_type, "t": data.get("t"), "data": data}
    if event_type == "token":
        return Token(**common, text=data["text"], tokens=int(data.get("tokens", 1)))
    if event_type == "progress":
        return Progress(
            **common,
            tokens=int(data["tokens"]),
            tokens_per_second=data.get("tokens_per_second"),
            estimated_total=data.get("estimated_total"),
            percent=data.get("percent"),
            eta_ms=data.get("eta_ms"),
        )
    if event_type == "tool_call":
        return ToolCall(
            **common,
            index=int(data.get("index", 0)),
            call_id=data.get("id"),
            name=data.get("name"),
            arguments=data.get("arguments") or "",
        )
    if event_type == "resumed":
        return Resumed(
            **common,
            attempt=int(data["attempt"]),
            after_event_id=int(data["after_event_id"]),
            reason=str(data.get("reason", "")),
        )
    if event_type == "metadata":
        return Metadata(**common, model=data.get("model", ""), created_at=data.get("created_at"))
    if event_type == "done":
        return Done(**common, finish_reason=data.get("finish_reason"), usage=data.get("usage"))
    if event_type == "error":
        return StreamFailed(
            **common,
            code=data.get("code", "unknown"),
            message=data.get("message", ""),
            retryable=bool(data.get("retryable", False)),
            retry_after=data.get("retry_after"),
        )
    return UnknownEvent(**common)
