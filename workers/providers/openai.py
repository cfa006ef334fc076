"""The ``openai`` provider: any OpenAI-compatible chat-completions server, through the official SDK.

``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` (read into ``Settings.upstream``) configure it as
they configure the SDK, so OpenAI, vLLM, Ollama, llama.cpp or LM Studio all work. The SDK
retries a failed request itself (``upstream_max_retries``) — safe, because that happens before
the first token is appended; once the stream has started, a failure is final and surfaces as a
``ProviderError``.

Continuation (``Provider.stream(request, resume)``, see ``workers.continuation``): the request
is sent again with the partial answer appended, shaped by the route's mode — as the last
assistant message with ``continue_final_message: true`` and ``add_generation_prompt: false``
in the body (vLLM), with ``"prefix": true`` on it (DeepSeek, Mistral), as it is (servers that
prefill a trailing assistant message, llama.cpp), or followed by a user message asking the
model to go on without repeating itself (any server; approximate at the seam). A limit on the
answer's tokens shrinks by the tokens already streamed; when none are left, the provider only
finishes with ``length``. An empty partial answer sends the original request.

Every failure maps to one stable code (the public ``error`` event carries it)::

    upstream_auth 401 · upstream_forbidden 403 · upstream_not_found 404 ·
    upstream_bad_request 400/422 · upstream_rate_limited 429 (retryable, retry_after) ·
    upstream_unavailable 5xx (retryable) · upstream_error (other status, or an error object
    inside the stream; retryable when the upstream says it is its own fault) ·
    upstream_timeout · upstream_connection (refused, or cut mid-stream) (both retryable) ·
    upstream_malformed (an unparseable chunk, or no finish_reason) · upstream_not_configured
"""

from __future__ import annotations

import contextlib
import email.utils
import inspect
import json
import math
import re
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

import anyio
import httpx2
import openai
from openai import AsyncOpenAI, AsyncStream
from openai.resources.chat.completions import AsyncCompletions
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from broker.closing import AsyncCloseable
from broker.request import GenerationRequest
from broker.setting_fields import Continuation
from broker.settings import GenerationSettings
from broker.upstream import Upstream
from workers.providers.base import (
    Chunk,
    Finish,
    ProviderError,
    Resume,
    TextDelta,
    ToolCallDelta,
    Usage,
)

#: Parameters ``create()`` takes as keywords; others travel in ``extra_body`` so parameters
#: newer than this SDK still reach the upstream. The broker sets the excluded ones itself, and
#: ``timeout``/``extra_*`` in a client's body are request fields, not SDK options.
_SET_BY_BROKER = {"self", "model", "messages", "stream", "stream_options", "max_tokens"}
_SDK_OPTIONS = {"extra_headers", "extra_query", "extra_body", "timeout"}
_SDK_PARAMS = frozenset(inspect.signature(AsyncCompletions.create).parameters) - (
    _SET_BY_BROKER | _SDK_OPTIONS
)

_STATUS_CODES = {
    401: ("upstream_auth", "rejected the API key"),
    403: ("upstream_forbidden", "refused access"),
    404: ("upstream_not_found", "does not know this model or endpoint"),
    400: ("upstream_bad_request", "rejected the request"),
    422: ("upstream_bad_request", "rejected the request"),
    429: ("upstream_rate_limited", "is rate limiting requests"),
}
_SECRET = re.compile(r"\b(sk-[A-Za-z0-9_*\-]{3,}|Bearer\s+\S+)")

#: The user message that follows the partial answer in ``prompt`` mode.
CONTINUE_INSTRUCTION = (
    "Your previous answer was cut off. Continue it exactly where it stopped: do not repeat "
    "anything already written and do not comment on the interruption. If it stopped in the "
    "middle of a word or sentence, finish that word or sentence first."
)


class OpenAIProvider(AsyncCloseable):
    name = "openai"

    def __init__(self, settings: GenerationSettings, upstream: Upstream) -> None:
        self._secrets = [upstream.api_key] if upstream.api_key else []
        self._timeout = settings.upstream_timeout_seconds
        self._client: AsyncOpenAI | None = None
        if upstream.configured:
            self._client = upstream.client(
                timeout=settings.upstream_timeout_seconds,
                max_retries=settings.upstream_max_retries,
            )

    async def stream(
        self, request: GenerationRequest, resume: Resume | None = None
    ) -> AsyncGenerator[Chunk, None]:
        """The upstream's chunks; with ``resume``, those of the answer's continuation."""
        if resume is not None:
            continued = continuation_request(request, resume)
            if continued is None:
                yield Finish("length")  # the earlier attempts used every token allowed
                return
            request = continued
        upstream = await self._open(request)
        finished = False
        try:
            while True:
                chunks = await self._next(upstream)
                if chunks is None:
                    break
                for chunk in chunks:
                    finished = finished or isinstance(chunk, Finish)
                    yield chunk
        finally:
            # Closing the response closes the connection: that is what stops the upstream
            # generating when the job is cancelled (``aclose()`` lands here).
            await _close_quietly(upstream)
        if not finished:
            raise _malformed("a stream without a finish reason, so the answer may be incomplete")

    async def _open(self, request: GenerationRequest) -> AsyncStream[ChatCompletionChunk]:
        if self._client is None:
            message = "No upstream is configured: set OPENAI_API_KEY, or OPENAI_BASE_URL."
            raise ProviderError("upstream_not_configured", message, retryable=False)
        known = {k: v for k, v in request.params.items() if k in _SDK_PARAMS}
        extra = {k: v for k, v in request.params.items() if k not in _SDK_PARAMS}
        if request.max_tokens is not None:
            known[request.max_tokens_field] = request.max_tokens
        try:
            # The messages were validated by the api; the SDK's TypedDicts only describe them.
            upstream: AsyncStream[ChatCompletionChunk] = await self._client.chat.completions.create(
                model=request.model,
                stream=True,
                messages=cast("list[ChatCompletionMessageParam]", request.messages),
                stream_options={"include_usage": True},
                extra_body=extra or None,
                **known,
            )
        except (openai.OpenAIError, httpx2.HTTPError, OSError, anyio.EndOfStream) as exc:
            raise self._error(exc) from exc
        return upstream

    async def _next(self, upstream: AsyncStream[ChatCompletionChunk]) -> list[Chunk] | None:
        """The next chunk's normalized pieces; None at the end of the stream."""
        try:
            chunk = await anext(upstream)
        except StopAsyncIteration:
            return None
        except (openai.OpenAIError, httpx2.HTTPError, OSError, anyio.EndOfStream) as exc:
            raise self._error(exc) from exc
        except ValueError as exc:  # json, UTF-8 or pydantic: the upstream sent garbage
            raise _malformed("a chunk that is not valid JSON") from exc
        try:
            return normalize(chunk)
        except (AttributeError, TypeError, ValueError) as exc:
            raise _malformed("a chunk that is not a chat.completion.chunk") from exc

    def _error(self, exc: BaseException) -> ProviderError:
        return to_provider_error(exc, timeout=self._timeout, secrets=self._secrets)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()


def continuation_request(request: GenerationRequest, resume: Resume) -> GenerationRequest | None:
    """``request`` asking for what follows ``resume.text``; None when no tokens are left."""
    if resume.mode in (Continuation.OFF, Continuation.EXACT):
        raise ValueError(f"the openai provider cannot continue in {resume.mode.value!r} mode")
    if not resume.text:
        return request  # nothing to continue from: the original request is the continuation
    max_tokens = request.max_tokens
    if max_tokens is not None:
        max_tokens -= resume.tokens
        if max_tokens <= 0:
            return None
    messages, params = _continued(request, resume)
    return replace(request, messages=messages, params=params, max_tokens=max_tokens)


def _continued(
    request: GenerationRequest, resume: Resume
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and parameters of ``resume.mode``'s continuation of ``request``."""
    partial: dict[str, Any] = {"role": "assistant", "content": resume.text}
    params = request.params
    added = [partial]
    if resume.mode is Continuation.CONTINUE_FINAL_MESSAGE:
        params = {**params, "continue_final_message": True, "add_generation_prompt": False}
    elif resume.mode is Continuation.PREFIX:
        partial["prefix"] = True
    elif resume.mode is Continuation.PROMPT:
        added.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    return [*request.messages, *added], params


def normalize(chunk: ChatCompletionChunk) -> list[Chunk]:
    """One SDK chunk as the provider protocol's chunks: deltas, then finish, then usage."""
    out: list[Chunk] = []
    # getattr: the SDK builds chunks without validation, so a field a server left out is
    # missing rather than None (a final chunk without "delta" is common enough).
    for choice in getattr(chunk, "choices", None) or ():
        delta = getattr(choice, "delta", None)
        if delta is not None:
            if delta.content:
                out.append(TextDelta(delta.content))
            for call in delta.tool_calls or ():
                fn = call.function
                args = (fn.arguments or "") if fn else ""
                out.append(ToolCallDelta(call.index, args, call.id, fn.name if fn else None))
            if delta.function_call is not None:  # the legacy ``functions`` parameter
                fc = delta.function_call
                out.append(ToolCallDelta(0, fc.arguments or "", None, fc.name))
        reason = getattr(choice, "finish_reason", None)
        if reason:
            out.append(Finish(reason))
    # Usage usually comes on a last chunk with no choices; some servers put it on the last
    # choice chunk instead, so it is read from every chunk.
    if chunk.usage is not None:
        u = chunk.usage
        out.append(Usage(u.prompt_tokens or 0, u.completion_tokens or 0, u.total_tokens or 0))
    return out


def to_provider_error(
    exc: BaseException, *, timeout: float, secrets: Sequence[str] = ()
) -> ProviderError:
    """Map an SDK or transport failure to a ``ProviderError`` with a stable code."""
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        message = f"The upstream did not answer within {timeout:g} seconds."
        return ProviderError("upstream_timeout", message, retryable=True)
    if isinstance(exc, openai.APIConnectionError | httpx2.HTTPError | OSError | anyio.EndOfStream):
        # A cut mid-stream arrives as APIConnectionError from the SDK's iterator, but raw
        # transport errors (httpx2 RemoteProtocolError, ReadError) can escape other paths.
        message = "The connection to the upstream failed or was cut before the answer ended."
        return ProviderError("upstream_connection", message, retryable=True)
    if isinstance(exc, openai.APIStatusError):
        return _status_error(exc, secrets)
    if isinstance(exc, openai.APIError):  # an {"error": ...} object inside the stream
        body = exc.body if isinstance(exc.body, dict) else {}
        code = body.get("code")
        server_side = body.get("type") == "server_error" or (isinstance(code, int) and code >= 500)
        message = f"The upstream reported an error during the stream: {_detail(exc, secrets)}"
        return ProviderError("upstream_error", message, retryable=server_side)
    message = f"The upstream request failed ({type(exc).__name__})."
    return ProviderError("upstream_error", message, retryable=False)


def _status_error(exc: openai.APIStatusError, secrets: Sequence[str]) -> ProviderError:
    status = exc.status_code
    code, what = _STATUS_CODES.get(status, ("upstream_error", "failed"))
    if status >= 500:
        code = "upstream_unavailable"
    retry_after = parse_retry_after(exc.response.headers) if status in (429, 503) else None
    message = f"The upstream {what} (HTTP {status}): {_detail(exc, secrets)}"
    if retry_after is not None:
        message += f" Retry after {retry_after:g} seconds."
    # The SDK retries 408, 409, 429 and 5xx too: the same request may succeed later.
    retryable = status in (408, 409, 429) or status >= 500
    return ProviderError(code, message, retryable=retryable, retry_after=retry_after)


def _malformed(what: str) -> ProviderError:
    return ProviderError("upstream_malformed", f"The upstream sent {what}.", retryable=False)


def _detail(exc: openai.APIError, secrets: Sequence[str]) -> str:
    """The upstream's own explanation, as one short sentence without secrets."""
    body = exc.body
    text = body.get("message") if isinstance(body, dict) else body
    if not isinstance(text, str) or not text.strip():
        text = "no details given" if body is None else json.dumps(body)[:200]
    for secret in secrets:
        text = text.replace(secret, "***")
    text = _SECRET.sub("***", " ".join(text.split()))[:300]
    return text if text.endswith((".", "!", "?")) else text + "."


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms``, else ``Retry-After`` (seconds or HTTP date)."""
    millis = _number(headers.get("retry-after-ms"))
    if millis is not None:
        return max(millis / 1000, 0.0)
    value = headers.get("retry-after")
    seconds = _number(value)
    if seconds is None and value is not None:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return None if seconds is None else max(seconds, 0.0)


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


async def _close_quietly(upstream: AsyncStream[ChatCompletionChunk]) -> None:
    # A connection that is already broken may fail to close; the error that broke it is the
    # one worth reporting. Shielded (and bounded) so that a cancelled job still closes it.
    with anyio.move_on_after(5, shield=True):
        with contextlib.suppress(httpx2.HTTPError, OSError, anyio.EndOfStream):
            await upstream.close()
