"""What the scripted upstream (``tests/support/openai_server.py``) answers, in OpenAI's
chat-completions wire format: the words of ``echo-model``, the calls of ``tool-model``, the
error bodies, the whole (``stream: false``) completion, and each streamed script as an async
generator of ``data: …`` frames.

Tests compare what a client received with these: ``echo_text(n)`` is the exact text of
``echo-model`` for ``max_tokens=n``, ``TOOL_CALLS`` the calls ``tool-model`` makes.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import JSONResponse, Response

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india")
DEFAULT_WORDS = 8
CUT_AFTER_WORDS = 3
#: (id, name, arguments) of the calls ``tool-model`` makes, in index order.
TOOL_CALLS = (
    ("call_weather_1", "get_weather", '{"city": "Paris", "unit": "celsius"}'),
    ("call_time_2", "get_time", '{"timezone": "Europe/Paris"}'),
)
ERROR_STATUSES = (400, 401, 403, 404, 409, 422, 429, 500, 503)
RETRY_AFTER_SECONDS = 7
SCRIPTED_MODELS = (
    "echo-model",
    "tool-model",
    "endless",
    "flaky-503",
    "cut-mid-stream",
    "malformed-chunk",
    "stream-error",
    "no-finish",
    "slow",
    *(f"error-{status}" for status in ERROR_STATUSES),
)


def echo_pieces(words: int = DEFAULT_WORDS) -> list[str]:
    """The content deltas ``echo-model`` streams: ``["alpha", " bravo", " charlie", …]``."""
    return [("" if i == 0 else " ") + WORDS[i % len(WORDS)] for i in range(words)]


def echo_text(words: int = DEFAULT_WORDS) -> str:
    """The whole text ``echo-model`` streams for ``max_tokens=words``."""
    return "".join(echo_pieces(words))


def prompt_tokens(messages: Any) -> int:
    """The prompt_tokens the server reports: whitespace-separated words of string contents."""
    return sum(
        len(m["content"].split())
        for m in messages or []
        if isinstance(m, dict) and isinstance(m.get("content"), str)
    )


def max_tokens(body: dict[str, Any]) -> int:
    """The words an answer to ``body`` has."""
    value = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_WORDS
    return int(value)


class AbortConnection(Exception):
    """Raised inside a streaming body: uvicorn then closes the socket mid-response."""


# -- whole answers ---------------------------------------------------------------------------


def error_body(status: int, message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(status: int, model: str, authorization: str | None) -> Response:
    """OpenAI's answer with HTTP ``status``: its error body, and the retry headers it sends."""
    headers: dict[str, str] = {}
    if status == 401:
        # Like OpenAI, echo the key presented: the broker must never repeat it.
        presented = (authorization or "").removeprefix("Bearer ")
        body = error_body(
            status,
            f"Incorrect API key provided: {presented}.",
            "invalid_request_error",
            "invalid_api_key",
        )
    elif status == 404:
        body = error_body(
            status,
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        )
    elif status == 429:
        headers["retry-after"] = str(RETRY_AFTER_SECONDS)
        body = error_body(
            status, "Rate limit reached for requests.", "requests", "rate_limit_exceeded"
        )
    elif status >= 500:
        headers["retry-after-ms"] = "1"
        body = error_body(
            status,
            "The server had an error while processing your request.",
            "server_error",
            None,
        )
    else:
        body = error_body(status, f"Scripted error {status}.", "invalid_request_error", None)
    return JSONResponse(body, status_code=status, headers=headers)


def completion_response(body: dict[str, Any]) -> Response:
    """The ``stream: false`` answer: one ``chat.completion`` with the echo text."""
    words = max_tokens(body)
    prompt = prompt_tokens(body.get("messages"))
    return JSONResponse(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "logprobs": None,
                    "message": {"role": "assistant", "content": echo_text(words)},
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": words,
                "total_tokens": prompt + words,
            },
        }
    )


# -- streamed answers ------------------------------------------------------------------------


def sse(payload: Any) -> bytes:
    """One ``data:`` frame: ``payload`` as compact JSON, or as it is when it is a string."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Completion:
    """Builds the chunks of one streamed completion."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.model = str(body.get("model"))
        self.id = f"chatcmpl-test-{time.monotonic_ns()}"
        self.created = int(time.time())
        options = body.get("stream_options") or {}
        self.include_usage = bool(options.get("include_usage"))

    def _chunk_of(self, choices: list[dict[str, Any]], **rest: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_test",
            "choices": choices,
            **rest,
        }

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._chunk_of([choice], **({"usage": None} if self.include_usage else {}))

    def usage(self, completion: int) -> dict[str, Any]:
        prompt = prompt_tokens(self.body.get("messages"))
        return self._chunk_of(
            [],
            usage={
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        )


Script = Callable[[Completion], AsyncIterator[bytes]]


async def echo(c: Completion) -> AsyncIterator[bytes]:
    words = max_tokens(c.body)
    yield sse(c.chunk({"role": "assistant", "content": "", "refusal": None}))
    for piece in echo_pieces(words):
        yield sse(c.chunk({"content": piece}))
    yield sse(c.chunk({}, "stop"))
    if c.include_usage:
        yield sse(c.usage(words))
    yield sse("[DONE]")


async def tools(c: Completion) -> AsyncIterator[bytes]:
    yield sse(c.chunk({"role": "assistant", "content": None}))
    for index, (call_id, name, arguments) in enumerate(TOOL_CALLS):
        # As OpenAI does: id, type and name come first, the arguments follow in pieces.
        first = {"index": index, "id": call_id, "type": "function"}
        fn = {"name": name, "arguments": ""}
        yield sse(c.chunk({"tool_calls": [{**first, "function": fn}]}))
        for start in range(0, len(arguments), 7):
            piece = {"arguments": arguments[start : start + 7]}
            yield sse(c.chunk({"tool_calls": [{"index": index, "function": piece}]}))
    yield sse(c.chunk({}, "tool_calls"))
    if c.include_usage:
        yield sse(c.usage(21))
    yield sse("[DONE]")


async def endless(c: Completion, disconnected: threading.Event) -> AsyncIterator[bytes]:
    """A word every 5 ms until the client goes away; then ``disconnected`` is set."""
    try:
        yield sse(c.chunk({"role": "assistant", "content": ""}))
        for piece in echo_pieces(100_000):
            yield sse(c.chunk({"content": piece}))
            await asyncio.sleep(0.005)
    finally:
        # Starlette cancels the body when it receives http.disconnect.
        disconnected.set()


async def cut(c: Completion) -> AsyncIterator[bytes]:
    yield sse(c.chunk({"role": "assistant", "content": ""}))
    for piece in echo_pieces(CUT_AFTER_WORDS):
        yield sse(c.chunk({"content": piece}))
    raise AbortConnection("cut-mid-stream")


async def malformed(c: Completion) -> AsyncIterator[bytes]:
    for piece in echo_pieces(2):
        yield sse(c.chunk({"content": piece}))
    yield b'data: {"id": "chatcmpl-broken", "choices": [\n\n'
    yield sse("[DONE]")


async def stream_error(c: Completion) -> AsyncIterator[bytes]:
    for piece in echo_pieces(2):
        yield sse(c.chunk({"content": piece}))
    yield sse(error_body(500, "The model crashed while generating.", "server_error", None))


async def no_finish(c: Completion) -> AsyncIterator[bytes]:
    for piece in echo_pieces(2):
        yield sse(c.chunk({"content": piece}))
    yield sse("[DONE]")


#: The streamed script of each model that has one of its own (``endless`` aside: it reports
#: the client's going away); every other scripted model streams ``echo``.
SCRIPTS: dict[str, Script] = {
    "tool-model": tools,
    "cut-mid-stream": cut,
    "malformed-chunk": malformed,
    "stream-error": stream_error,
    "no-finish": no_finish,
}
