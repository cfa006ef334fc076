"""The broker's events as the Vercel AI SDK's UI message stream (pure: no I/O).

``GET /v1/streams/{id}/events?format=ai-sdk`` answers what the AI SDK's chat transport
reads (``ai``'s ``uiMessageChunkSchema``, protocol ``v1``): SSE frames whose ``data`` is one
UI message chunk, ending with ``data: [DONE]``, under the ``x-vercel-ai-ui-message-stream``
header. One assistant message per generation:

=============  ==============================================================================
broker event   chunks
=============  ==============================================================================
(first one)    ``start`` (``messageId`` = the stream id; ``messageMetadata`` = ``model``,
               ``created_at`` from ``metadata``), ``start-step``
``token``      ``text-start`` when no text part is open (ids ``text-0``, ``text-1``, …), then
               ``text-delta``
``tool_call``  ``text-end`` of an open text part; ``tool-input-start`` for a new call (the
               call before it gets its ``tool-input-available``), then ``tool-input-delta``
``progress``   a transient ``data-progress`` (the chat client's ``onData``; not stored in
               the message)
``resumed``    a transient ``data-resumed`` (``attempt``, ``after_event_id``, ``reason``); an
               open text part stays open: the next attempt's text goes on in it
``done``       ``text-end``, ``tool-input-available`` of the open calls (``tool-input-error``
               when their arguments are not JSON), ``finish-step``, ``finish``
               (``finishReason``; ``messageMetadata`` = ``usage``, ``finish_reason``), ``[DONE]``
``error``      ``text-end``, ``error`` (``errorText``, plus the broker's ``code`` and
               ``retryable``), ``[DONE]``
=============  ==============================================================================

The chunks depend on what came before (is a text part open? which calls are streaming?),
so a resume first ``replay``s the events the client has; part ids are counted, not taken
from event ids, so they are the same whichever way the events were batched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from api.resume import ResumePoint
from api.transcode import Payload
from broker.events import Event

#: The response header that names the protocol (``ai``'s ``UI_MESSAGE_STREAM_HEADERS``).
HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}

#: The AI SDK's finish reasons, by the broker's (OpenAI's) names; anything else is "other".
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool-calls",
    "content_filter": "content-filter",
}


@dataclass
class _ToolInput:
    call_id: str
    name: str
    arguments: str = ""


@dataclass
class UIMessageChunks:
    """One stream's UI message chunks: a ``ChunkEncoder`` (``api.transcode``)."""

    stream_id: str
    started: bool = False
    #: The id of the open text part, if one is open.
    text_id: str | None = None
    text_parts: int = 0
    #: Tool calls whose input is still streaming, by their index in the provider's answer.
    tools: dict[int, _ToolInput] = field(default_factory=dict)
    stateful = True

    def lead(self, resume: ResumePoint) -> list[Payload]:
        return []

    def stamp(self, payload: dict[str, Any], event_id: str) -> dict[str, Any]:
        return payload

    def replay(self, events: Iterable[Event]) -> None:
        for event in events:
            self.encode(event.seq, event.type.value, event.data)

    def encode(self, seq: int, event_type: str, data: dict[str, Any]) -> list[Payload]:
        out: list[Payload] = []
        if not self.started:
            self.started = True
            start: dict[str, Any] = {"type": "start", "messageId": self.stream_id}
            if event_type == "metadata":
                start["messageMetadata"] = {
                    "model": data.get("model"),
                    "created_at": data.get("created_at"),
                }
            out += [start, {"type": "start-step"}]
        if event_type == "token":
            out += self._finish_tools()
            if self.text_id is None:
                self.text_id = f"text-{self.text_parts}"
                self.text_parts += 1
                out.append({"type": "text-start", "id": self.text_id})
            out.append({"type": "text-delta", "id": self.text_id, "delta": data["text"]})
        elif event_type == "tool_call":
            out += self._end_text()
            out += self._tool_delta(data)
        elif event_type == "progress":
            progress = {k: v for k, v in data.items() if k != "t"}
            out.append({"type": "data-progress", "data": progress, "transient": True})
        elif event_type == "resumed":
            # Only a note that another worker took over: the text before and after the seam
            # is one answer, so the open text part (and any streaming call) stays open.
            seam = {k: v for k, v in data.items() if k != "t"}
            out.append({"type": "data-resumed", "data": seam, "transient": True})
        elif event_type == "done":
            out += self._end_text() + self._finish_tools()
            raw = data.get("finish_reason") or "stop"
            metadata = {"finish_reason": raw, "usage": data.get("usage")}
            out += [
                {"type": "finish-step"},
                {
                    "type": "finish",
                    "finishReason": FINISH_REASONS.get(raw, "other"),
                    "messageMetadata": metadata,
                },
                "[DONE]",
            ]
        elif event_type == "error":
            error = {
                "type": "error",
                "errorText": str(data.get("message") or data.get("code") or "error"),
                "code": data.get("code"),
                "retryable": bool(data.get("retryable")),
            }
            out += [*self._end_text(), error, "[DONE]"]
        return out

    def _end_text(self) -> list[Payload]:
        if self.text_id is None:
            return []
        ended: Payload = {"type": "text-end", "id": self.text_id}
        self.text_id = None
        return [ended]

    def _tool_delta(self, data: dict[str, Any]) -> list[Payload]:
        index = int(data.get("index", 0))
        out: list[Payload] = []
        tool = self.tools.get(index)
        if tool is None:
            out += self._finish_tools()  # the provider moved on to the next call
            call_id = str(data.get("id") or f"{self.stream_id}-call-{index}")
            tool = self.tools[index] = _ToolInput(call_id, str(data.get("name") or ""))
            out.append({"type": "tool-input-start", "toolCallId": call_id, "toolName": tool.name})
        elif data.get("name"):
            tool.name += str(data["name"])
        if data.get("arguments"):
            tool.arguments += data["arguments"]
            out.append(
                {
                    "type": "tool-input-delta",
                    "toolCallId": tool.call_id,
                    "inputTextDelta": data["arguments"],
                }
            )
        return out

    def _finish_tools(self) -> list[Payload]:
        out: list[Payload] = []
        for index in sorted(self.tools):
            tool = self.tools.pop(index)
            chunk: dict[str, Any] = {"toolCallId": tool.call_id, "toolName": tool.name}
            try:
                chunk.update(type="tool-input-available", input=json.loads(tool.arguments or "{}"))
            except ValueError:
                chunk.update(
                    type="tool-input-error",
                    input=tool.arguments,
                    errorText="the tool call's arguments are not JSON",
                )
            out.append(chunk)
        return out
