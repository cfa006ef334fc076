"""A local OpenAI-compatible server for tests, speaking the real chat-completions wire format.

Streamed answers are what OpenAI sends: ``data: {json}\\n\\n`` frames of ``chat.completion.chunk``
objects (a first chunk with the assistant role, content or tool-call deltas, a chunk with the
``finish_reason``, the usage chunk with ``"choices": []`` when ``stream_options.include_usage``
asks for it) and ``data: [DONE]``. The requested model name scripts the behaviour:

==================  ===========================================================================
``echo-model``      ``max_tokens`` words (default 8) of ``echo_text(n)``, one word per chunk
``tool-model``      the two ``TOOL_CALLS``, arguments split over several deltas; ``tool_calls``
``endless``         a word every few ms until the client goes away (sets ``disconnected``)
``error-NNN``       HTTP NNN (400, 401, 403, 404, 409, 422, 429, 500, 503), an OpenAI error body;
                    429 carries ``Retry-After: 7``, 5xx ``retry-after-ms: 1`` (fast SDK retries)
``flaky-503``       503 on the first request after a reset, then the ``echo-model`` answer
``cut-mid-stream``  ``CUT_AFTER_WORDS`` words, then the connection closes mid-body
``malformed-chunk`` two words, then a data line that is not JSON
``stream-error``    two words, then ``{"error": {...}}`` inside the stream (a server_error)
``no-finish``       two words and ``[DONE]``, but no chunk carries a finish_reason
``slow``            waits ``slow_seconds`` (or until the client leaves) before answering
==================  ===========================================================================

Any other model answers 404 ``model_not_found``, as OpenAI does. ``GET /v1/models`` lists the
scripted models; ``models_mode`` makes it answer 404/405/501/500, a malformed body, or slowly.

In tests::

    with OpenAIServer() as server:           # a thread, a free port on 127.0.0.1
        server.base_url                      # "http://127.0.0.1:PORT/v1"
        server.requests["error-500"]         # chat requests per model (SDK retries included)

As a process (end-to-end tests point workers at it with ``OPENAI_BASE_URL``)::

    python -m tests.support.openai_server --port 8123 [--models-mode 404]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.background import Background
from tests.support.waiting import eventually

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
MODELS_MODES = ("list", "404", "405", "501", "500", "malformed", "slow")


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


class AbortConnection(Exception):
    """Raised inside a streaming body: uvicorn then closes the socket mid-response."""


class _QuietAbort(logging.Filter):
    """Drop uvicorn's traceback for the aborts we cause on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        return not isinstance(exc, AbortConnection)


_error_log = logging.getLogger("uvicorn.error")
if not any(isinstance(f, _QuietAbort) for f in _error_log.filters):
    _error_log.addFilter(_QuietAbort())


def _sse(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _error_body(status: int, message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _Completion:
    """Builds the chunks of one streamed completion."""

    def __init__(self, body: dict[str, Any]) -> None:
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

    def usage(self, prompt: int, completion: int) -> dict[str, Any]:
        return self._chunk_of(
            [],
            usage={
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        )


class OpenAIServer(Background):
    """The scripted upstream, on a free port of 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        models_mode: str = "list",
        slow_seconds: float = 30.0,
        api_key: str | None = None,
    ) -> None:
        if models_mode not in MODELS_MODES:
            raise ValueError(f"models_mode must be one of {', '.join(MODELS_MODES)}")
        self.host, self.port = host, port
        self.models_mode = models_mode
        self.slow_seconds = slow_seconds
        #: When set, requests must carry ``Authorization: Bearer <api_key>`` (else 401).
        self.api_key = api_key
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    # -- observations tests make ------------------------------------------------------------

    def reset(self) -> None:
        """Forget what was recorded (between tests sharing one server)."""
        self.requests: collections.Counter[str] = collections.Counter()
        self.models_requests = 0
        self.bodies: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        #: Set when a client goes away while a streaming answer is still being sent.
        self.disconnected = threading.Event()

    @property
    def last_body(self) -> dict[str, Any]:
        return self.bodies[-1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # -- endpoints ---------------------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        self.models_requests += 1
        mode = self.models_mode
        if mode == "slow":
            await _wait_unless_disconnected(request, self.slow_seconds)
        if mode.isdigit():
            return JSONResponse(
                _error_body(
                    int(mode), f"Scripted /models error {mode}.", "invalid_request_error", None
                ),
                status_code=int(mode),
            )
        if mode == "malformed":
            return Response("<html>not a model list</html>", media_type="text/html")
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "tests"} for m in SCRIPTED_MODELS
        ]
        return JSONResponse({"object": "list", "data": data})

    async def _chat(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        model = str(body.get("model"))
        self.requests[model] += 1
        self.bodies.append(body)
        authorization = request.headers.get("authorization")
        self.authorizations.append(authorization)
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            return self._error(401, model, authorization)
        if model.startswith("error-") and model[6:].isdigit():
            return self._error(int(model[6:]), model, authorization)
        if model == "flaky-503" and self.requests[model] == 1:
            return self._error(503, model, authorization)
        if model == "slow" and not await _wait_unless_disconnected(request, self.slow_seconds):
            return Response(status_code=499)
        if model not in SCRIPTED_MODELS:
            return self._error(404, model, authorization)
        if not body.get("stream"):
            return self._complete(body)
        completion = _Completion(body)
        script = {
            "tool-model": self._tools,
            "endless": self._endless,
            "cut-mid-stream": self._cut,
            "malformed-chunk": self._malformed,
            "stream-error": self._stream_error,
            "no-finish": self._no_finish,
        }
        frames = script.get(model, self._echo)(completion, body)
        return StreamingResponse(frames, media_type="text/event-stream")

    def _error(self, status: int, model: str, authorization: str | None) -> Response:
        headers: dict[str, str] = {}
        if status == 401:
            # Like OpenAI, echo the key presented: the broker must never repeat it.
            presented = (authorization or "").removeprefix("Bearer ")
            body = _error_body(
                status,
                f"Incorrect API key provided: {presented}.",
                "invalid_request_error",
                "invalid_api_key",
            )
        elif status == 404:
            body = _error_body(
                status,
                f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            )
        elif status == 429:
            headers["retry-after"] = str(RETRY_AFTER_SECONDS)
            body = _error_body(
                status, "Rate limit reached for requests.", "requests", "rate_limit_exceeded"
            )
        elif status >= 500:
            headers["retry-after-ms"] = "1"
            body = _error_body(
                status,
                "The server had an error while processing your request.",
                "server_error",
                None,
            )
        else:
            body = _error_body(status, f"Scripted error {status}.", "invalid_request_error", None)
        return JSONResponse(body, status_code=status, headers=headers)

    def _complete(self, body: dict[str, Any]) -> Response:
        words = _max_tokens(body)
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

    # -- streamed scripts --------------------------------------------------------------------

    async def _echo(self, c: _Completion, body: dict[str, Any]) -> AsyncIterator[bytes]:
        words = _max_tokens(body)
        yield _sse(c.chunk({"role": "assistant", "content": "", "refusal": None}))
        for piece in echo_pieces(words):
            yield _sse(c.chunk({"content": piece}))
        yield _sse(c.chunk({}, "stop"))
        if c.include_usage:
            yield _sse(c.usage(prompt_tokens(body.get("messages")), words))
        yield _sse("[DONE]")

    async def _tools(self, c: _Completion, body: dict[str, Any]) -> AsyncIterator[bytes]:
        yield _sse(c.chunk({"role": "assistant", "content": None}))
        for index, (call_id, name, arguments) in enumerate(TOOL_CALLS):
            # As OpenAI does: id, type and name come first, the arguments follow in pieces.
            first = {"index": index, "id": call_id, "type": "function"}
            fn = {"name": name, "arguments": ""}
            yield _sse(c.chunk({"tool_calls": [{**first, "function": fn}]}))
            for start in range(0, len(arguments), 7):
                piece = {"arguments": arguments[start : start + 7]}
                yield _sse(c.chunk({"tool_calls": [{"index": index, "function": piece}]}))
        yield _sse(c.chunk({}, "tool_calls"))
        if c.include_usage:
            yield _sse(c.usage(prompt_tokens(body.get("messages")), 21))
        yield _sse("[DONE]")

    async def _endless(self, c: _Completion, body: dict[str, Any]) -> AsyncIterator[bytes]:
        disconnected = self.disconnected  # this test's event, even if the next one resets
        try:
            yield _sse(c.chunk({"role": "assistant", "content": ""}))
            for piece in echo_pieces(100_000):
                yield _sse(c.chunk({"content": piece}))
                await asyncio.sleep(0.005)
        finally:
            # Starlette cancels the body when it receives http.disconnect.
            disconnected.set()

    async def _cut(self, c: _Completion, body: dict[str, Any]) -> AsyncIterator[bytes]:
        yield _sse(c.chunk({"role": "assistant", "content": ""}))
        for piece in echo_pieces(CUT_AFTER_WORDS):
            yield _sse(c.chunk({"content": piece}))
        raise AbortConnection("cut-mid-stream")

    async def _malformed(self, c: _Completion, body: dict[str, Any]) -> AsyncIterator[bytes]:
        for piece in echo_pieces(2):
            yield _sse(c.chunk({"content": piece}))
        yield b'data: {"id": "chatcmpl-broken", "choices": [\n\n'
        yield _sse("[DONE]")

    async def _stream_error(self, c: _Completion, body: dict[str, Any]) -> AsyncIterator[bytes]:
        for piece in echo_pieces(2):
            yield _sse(c.chunk({"content": piece}))
        yield _sse(_error_body(500, "The model crashed while generating.", "server_error", None))

    async def _no_finish(self, c: _Completion, body: dict[str, Any]) -> AsyncIterator[bytes]:
        for piece in echo_pieces(2):
            yield _sse(c.chunk({"content": piece}))
        yield _sse("[DONE]")

    # -- running -----------------------------------------------------------------------------

    def _config(self, **overrides: Any) -> uvicorn.Config:
        options: dict[str, Any] = {
            "http": "h11",
            "lifespan": "off",
            "access_log": False,
            "log_level": "warning",
            "timeout_graceful_shutdown": 1,
            **overrides,
        }
        return uvicorn.Config(self.app, **options)

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(128)  # connections queue from now on: no start-up race for clients
        self.port = sock.getsockname()[1]
        return sock

    def start(self, timeout: float = 10.0) -> None:
        """Serve in a daemon thread; returns once uvicorn is serving."""
        sock = self._bind()
        # log_config=None leaves the test process's logging configuration alone.
        self._server = uvicorn.Server(self._config(log_config=None))
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name=f"openai-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        server, thread = self._server, self._thread

        def serving() -> bool:
            if not thread.is_alive():
                raise RuntimeError("the test OpenAI server stopped while starting")
            return server.started

        try:
            eventually(serving, timeout=timeout, interval=0.01, what="the OpenAI server to start")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout / 2)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout / 2)
        self._server = self._thread = None

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (the ``python -m`` entry point)."""
        sock = self._bind()
        print(f"openai test server listening on {self.base_url}", flush=True)
        uvicorn.Server(self._config()).run(sockets=[sock])


def _max_tokens(body: dict[str, Any]) -> int:
    value = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_WORDS
    return int(value)


async def _wait_unless_disconnected(request: Request, seconds: float) -> bool:
    """Sleep ``seconds``; False as soon as the client disconnects instead."""
    with anyio.move_on_after(seconds):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--models-mode", choices=MODELS_MODES, default="list")
    parser.add_argument("--slow-seconds", type=float, default=30.0)
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    args = parser.parse_args(argv)
    OpenAIServer(
        host=args.host,
        port=args.port,
        models_mode=args.models_mode,
        slow_seconds=args.slow_seconds,
        api_key=args.api_key,
    ).serve_forever()


if __name__ == "__main__":
    main()
