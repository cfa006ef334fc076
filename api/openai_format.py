"""The broker's events in OpenAI's chat completion format (pure: no I/O).

``OpenAIChunks`` turns the events of one stream into ``chat.completion.chunk`` objects as
OpenAI streams them: a first chunk with the role, content and tool-call deltas, a last
chunk with ``finish_reason``, a usage chunk (``choices: []``) when the request asked for
``stream_options.include_usage``, then ``[DONE]``. ``Completion`` folds the same events into
one ``chat.completion`` for ``stream: false``.

Every SSE frame carries an id (``api.resume``: the last chunk, the usage chunk and
``[DONE]`` of the ``done`` event get ``<n>.1``, ``<n>.2`` and the event's id), so a client
resumes the OpenAI format with ``Last-Event-ID`` like any other watcher, and each chunk
repeats its id in ``event_id`` for SDK users, who never see SSE ids. A resumed stream starts
with the role chunk. ``progress`` events have no OpenAI counterpart, nor do ``resumed`` ones
(the seam where another worker continued the answer: the text just goes on).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from api.resume import ResumePoint
from api.transcode import Payload
from broker.events import Event
from broker.state import GenerationState

#: The field of every chunk that holds its frame's SSE id: where an SDK user resumes from.
EVENT_ID_FIELD = "event_id"

#: OpenAI's finish reasons; the broker's ``cancelled`` is reported as ``stop`` (the client
#: asked it to stop) so strict clients that check the value accept it.
FINISH_REASONS = {"cancelled": "stop"}

#: The ``type`` of OpenAI's error object, by HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; its ``code`` and ``message`` are also the broker's own shape."""
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "api_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def completion_id(stream_id: str) -> str:
    return f"chatcmpl-{stream_id}"


def finish_reason(raw: str | None) -> str:
    return FINISH_REASONS.get(raw or "stop", raw or "stop")


@dataclass
class OpenAIChunks:
    """One stream's ``chat.completion.chunk`` objects: a ``ChunkEncoder`` (``api.transcode``).

    Each chunk also carries ``event_id`` (``EVENT_ID_FIELD``): the SSE id of its frame, for
    SDK users, who never see SSE ids, to resume from with ``Last-Event-ID``."""

    stream_id: str
    model: str
    created: int
    include_usage: bool
    stateful = False

    def lead(self, resume: ResumePoint) -> list[Payload]:
        """A resumed stream starts with the role chunk, as every OpenAI stream does (the
        SDKs' accumulators need it); it has no SSE id, so the resume point does not move,
        and its ``event_id`` is the resume point itself."""
        if not resume.resumed:
            return []
        return [{**self._chunk({"role": "assistant", "content": ""}), EVENT_ID_FIELD: str(resume)}]

    def encode(self, seq: int, event_type: str, data: dict[str, Any]) -> list[Payload]:
        if event_type == "metadata":
            return [self._chunk({"role": "assistant", "content": ""})]
        if event_type == "token":
            return [self._chunk({"content": data["text"]})]
        if event_type == "tool_call":
            return [self._chunk({"tool_calls": [tool_call_delta(data)]})]
        if event_type == "done":
            payloads: list[Payload] = [self._chunk({}, finish_reason(data.get("finish_reason")))]
            if self.include_usage:
                payloads.append({**self._chunk(None), "choices": [], "usage": data.get("usage")})
            payloads.append("[DONE]")
            return payloads
        if event_type == "error":
            # The openai SDK raises APIError on a chunk that carries "error".
            body = error_body(500, data.get("code", "error"), data.get("message", ""))
            body["error"]["retryable"] = bool(data.get("retryable"))
            return [body]
        # progress, resumed (no text: the answer goes on in the next token), and types added
        # later: nothing in OpenAI's format
        return []

    def replay(self, events: Iterable[Event]) -> None:
        """Stateless: a chunk depends on its event alone."""

    def stamp(self, payload: dict[str, Any], event_id: str) -> dict[str, Any]:
        return {**payload, EVENT_ID_FIELD: event_id}

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": completion_id(self.stream_id),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }
        if delta is not None:
            chunk["choices"] = [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            ]
        return chunk


def tool_call_delta(data: dict[str, Any]) -> dict[str, Any]:
    """A broker ``tool_call`` event as an OpenAI ``delta.tool_calls`` item: ``id``, ``type``
    and ``name`` only where the provider sent them (the first delta of a call)."""
    delta: dict[str, Any] = {"index": data.get("index", 0)}
    function: dict[str, Any] = {}
    if data.get("id"):
        delta["id"] = data["id"]
        delta["type"] = "function"
    if data.get("name"):
        function["name"] = data["name"]
    function["arguments"] = data.get("arguments") or ""
    delta["function"] = function
    return delta


@dataclass
class Completion:
    """``stream: false``: the events folded into one ``chat.completion``."""

    stream_id: str
    model: str
    created: int
    text: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish: str | None = None
    usage: dict[str, Any] | None = None
    #: The stream's terminal ``error`` data, when it failed.
    error: dict[str, Any] | None = None

    def add(self, event_type: str, data: dict[str, Any]) -> None:
        if event_type == "token":
            self.text.append(data["text"])
        elif event_type == "tool_call":
            call = self.tool_calls.setdefault(
                int(data.get("index", 0)),
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
            )
            if data.get("id"):
                call["id"] = data["id"]
            if data.get("name"):
                call["function"]["name"] += data["name"]
            call["function"]["arguments"] += data.get("arguments") or ""
        elif event_type == "done":
            self.finish = finish_reason(data.get("finish_reason"))
            self.usage = data.get("usage")
        elif event_type == "error":
            self.error = data

    def body(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(self.text) if self.text or not self.tool_calls else None,
            "refusal": None,
        }
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return {
            "id": completion_id(self.stream_id),
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish}
            ],
            "usage": self.usage,
        }


def openai_chunks(state: GenerationState, include_usage: bool) -> OpenAIChunks:
    return OpenAIChunks(
        stream_id=state.id,
        model=state.model,
        created=state.created_at_ms // 1000,
        include_usage=include_usage,
    )
