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
``paced-echo``      the ``echo-model`` answer, one word every ``pace_ms`` milliseconds (sets
                    ``disconnected`` if the client leaves first): a worker can be killed mid-answer
==================  ===========================================================================

The pace of ``paced-echo`` is the request's ``X-Pace-Ms`` header, else a ``pace_ms`` field of
its body (a broker passes unknown fields on, so a client of the broker can set it), else the
server's ``pace_ms`` (default ``DEFAULT_PACE_MS``, 50; ``--pace-ms`` on the command line).

Continuation requests (``continuation_of``): the last message is the partial answer, as an
assistant message, and either the body sets ``continue_final_message: true`` with
``add_generation_prompt: false`` (vLLM) or that message has ``"prefix": true`` (DeepSeek,
Mistral). Streamed to one of the echo models (``CONTINUING_MODELS``: ``echo-model``,
``flaky-503``, ``slow``, ``paced-echo``), such a request gets only what follows the partial
answer (``continuation_pieces``): the partial answer and the continuation make ``echo_text(n)``,
with ``n`` the partial's words plus ``max_tokens`` (or, without ``max_tokens``, the usual 8 words
in all), so a reader's text is exactly what an uninterrupted answer is. A word cut in the middle
is finished first. Usage counts the continuation's own words, and its prompt includes the
partial answer. As in vLLM, ``continue_final_message`` with ``add_generation_prompt`` left true,
or without a trailing assistant message, is a 400. A trailing assistant message with neither
flag is an ordinary chat, answered from the start, as OpenAI itself would: prefill and prompt
continuations are visibly approximate here. The other models, and ``stream: false`` answers,
ignore continuation.

Any other model answers 404 ``model_not_found``, as OpenAI does. ``GET /v1/models`` lists the
scripted models; ``models_mode`` makes it answer 404/405/501/500, a malformed body, or slowly.
This module routes, records and runs, and streams the continuations and ``paced-echo``; the
other answers (chunks, error bodies, the streamed scripts) are built in
``tests/support/openai_answers.py``.

In tests::

    with OpenAIServer() as server:           # a thread, a free port on 127.0.0.1
        server.base_url                      # "http://127.0.0.1:PORT/v1"
        server.requests["error-500"]         # chat requests per model (SDK retries included)
        server.bodies, server.last_body      # every chat request's JSON body, in order
        continuation_of(server.last_body)    # the partial answer it continues, or None

As a process (end-to-end tests point workers at it with ``OPENAI_BASE_URL``)::

    python -m tests.support.openai_server --port 8123 [--models-mode 404] [--pace-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import re
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.background import Background
from tests.support.openai_answers import (
    CUT_AFTER_WORDS,
    DEFAULT_WORDS,
    RETRY_AFTER_SECONDS,
    SCRIPTS,
    TOOL_CALLS,
    AbortConnection,
    Completion,
    completion_response,
    echo,
    echo_pieces,
    echo_text,
    endless,
    error_body,
    error_response,
    max_tokens,
    prompt_tokens,
    sse,
)
from tests.support.openai_answers import SCRIPTED_MODELS as ANSWERED_MODELS
from tests.support.waiting import eventually

#: What tests import from here (the scripted answers themselves live in ``openai_answers``).
__all__ = [
    "CONTINUING_MODELS",
    "CUT_AFTER_WORDS",
    "DEFAULT_PACE_MS",
    "PACED_MODEL",
    "RETRY_AFTER_SECONDS",
    "SCRIPTED_MODELS",
    "TOOL_CALLS",
    "OpenAIServer",
    "continuation_of",
    "continuation_pieces",
    "echo_pieces",
    "echo_text",
    "prompt_tokens",
]

MODELS_MODES = ("list", "404", "405", "501", "500", "malformed", "slow")
PACED_MODEL = "paced-echo"
DEFAULT_PACE_MS = 50.0
#: Every model the server knows (``GET /v1/models`` lists them).
SCRIPTED_MODELS = (*ANSWERED_MODELS, PACED_MODEL)
#: The models that continue a partial answer (the others run their script regardless).
CONTINUING_MODELS = frozenset({"echo-model", "flaky-503", "slow", PACED_MODEL})
_WORD = re.compile(r"\s*\S+")


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
        pace_ms: float = DEFAULT_PACE_MS,
    ) -> None:
        if models_mode not in MODELS_MODES:
            raise ValueError(f"models_mode must be one of {', '.join(MODELS_MODES)}")
        self.host, self.port = host, port
        self.models_mode = models_mode
        self.slow_seconds = slow_seconds
        #: ``paced-echo``'s milliseconds between words when the request does not say.
        self.pace_ms = pace_ms
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
                error_body(
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
            return error_response(401, model, authorization)
        if model.startswith("error-") and model[6:].isdigit():
            return error_response(int(model[6:]), model, authorization)
        if model == "flaky-503" and self.requests[model] == 1:
            return error_response(503, model, authorization)
        if model == "slow" and not await _wait_unless_disconnected(request, self.slow_seconds):
            return Response(status_code=499)
        if model not in SCRIPTED_MODELS:
            return error_response(404, model, authorization)
        refusal = _continuation_refusal(body)
        if refusal is not None:
            return JSONResponse(refusal, status_code=400)
        if not body.get("stream"):
            return completion_response(body)
        frames = self._frames(request, Completion(body))
        return StreamingResponse(frames, media_type="text/event-stream")

    def _frames(self, request: Request, completion: Completion) -> AsyncIterator[bytes]:
        """The streamed answer: a continuation, the paced words, or the model's script."""
        body, model = completion.body, completion.model
        partial = continuation_of(body)
        if partial is not None and model in CONTINUING_MODELS:
            pieces = continuation_pieces(partial, _limit(body))
        elif model == PACED_MODEL:
            pieces = echo_pieces(max_tokens(body))
        elif model == "endless":
            return endless(completion, self.disconnected)
        else:
            return SCRIPTS.get(model, echo)(completion)
        pace = self._pace_seconds(request, body) if model == PACED_MODEL else 0.0
        return words(completion, pieces, pace, self.disconnected)

    def _pace_seconds(self, request: Request, body: dict[str, Any]) -> float:
        """``paced-echo``'s pause between words: the header's, the body's, or the server's."""
        value = request.headers.get("x-pace-ms", body.get("pace_ms", self.pace_ms))
        return max(float(value), 0.0) / 1000

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


def continuation_of(body: dict[str, Any]) -> str | None:
    """The partial answer a continuation request (see the module docstring) asks the model to
    continue; None when ``body`` is not one (even with a trailing assistant message)."""
    last = _trailing_assistant(body)
    if last is None:
        return None
    final = body.get("continue_final_message") is True
    final = final and body.get("add_generation_prompt") is False
    content = last.get("content")
    if (final or last.get("prefix") is True) and isinstance(content, str):
        return content
    return None


def continuation_pieces(partial: str, limit: int | None = None) -> list[str]:
    """What the echo models stream after ``partial``: ``partial`` plus these is
    ``echo_text(n)``, ``n`` the words ``partial`` began plus ``limit`` (max_tokens) — or, with
    no limit, at least the ``DEFAULT_WORDS`` of an uninterrupted answer. A partial that is not
    echo's own text is followed by the words after as many as it has."""
    begun = len(partial.split())
    total = begun + limit if limit is not None else max(DEFAULT_WORDS, begun)
    text = echo_text(total)
    if not text.startswith(partial):
        return echo_pieces(total)[begun:]
    return _WORD.findall(text[len(partial) :])


async def words(
    c: Completion, pieces: list[str], pace: float, disconnected: threading.Event
) -> AsyncIterator[bytes]:
    """``pieces`` as content deltas, ``pace`` seconds apart, then ``stop`` and the usage; sets
    ``disconnected`` if the client goes away before the end."""
    done = False
    try:
        yield sse(c.chunk({"role": "assistant", "content": "", "refusal": None}))
        for i, piece in enumerate(pieces):
            if i and pace:
                await asyncio.sleep(pace)
            yield sse(c.chunk({"content": piece}))
        yield sse(c.chunk({}, "stop"))
        if c.include_usage:
            yield sse(c.usage(len(pieces)))
        yield sse("[DONE]")
        done = True
    finally:
        if not done:  # Starlette cancels the body when it receives http.disconnect
            disconnected.set()


def _continuation_refusal(body: dict[str, Any]) -> dict[str, Any] | None:
    """vLLM's 400 for a ``continue_final_message`` it cannot honour; None when it can."""
    if body.get("continue_final_message") is not True:
        return None
    if body.get("add_generation_prompt", True) is not False:
        message = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
    elif _trailing_assistant(body) is None:
        message = "`continue_final_message` needs the last message to be from the assistant."
    else:
        return None
    return error_body(400, message, "BadRequestError", None)


def _trailing_assistant(body: dict[str, Any]) -> dict[str, Any] | None:
    """The last message when it is the assistant's."""
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    return last if isinstance(last, dict) and last.get("role") == "assistant" else None


def _limit(body: dict[str, Any]) -> int | None:
    """The request's ``max_tokens`` (or ``max_completion_tokens``); None when it sets none."""
    value = body.get("max_tokens")
    value = body.get("max_completion_tokens") if value is None else value
    return None if value is None else int(value)


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
    parser.add_argument(
        "--pace-ms", type=float, default=DEFAULT_PACE_MS, help="paced-echo's ms between words"
    )
    args = parser.parse_args(argv)
    OpenAIServer(
        host=args.host,
        port=args.port,
        models_mode=args.models_mode,
        slow_seconds=args.slow_seconds,
        api_key=args.api_key,
        pace_ms=args.pace_ms,
    ).serve_forever()


if __name__ == "__main__":
    main()
