"""OpenAI's chat completions API over the broker: ``POST /v1/chat/completions``.

A request becomes a broker generation like any ``POST /v1/streams`` (same validation,
models, auth, limits), so it is durable, resumable and watchable by others: its id is in
the ``X-Stream-Id`` header. ``stream: true`` answers ``chat.completion.chunk`` SSE exactly as
OpenAI does and every frame carries an ``id:``, so ``GET /v1/streams/{id}/events?format=openai``
(with ``Last-Event-ID``) resumes it. ``stream: false`` waits for the end and answers one
``chat.completion``. Errors come in OpenAI's error shape, which includes the broker's own
``code`` and ``message``; ``x-should-retry`` tells the openai SDK whether to retry.
"""

from __future__ import annotations

from collections.abc import Coroutine
from contextlib import aclosing
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.auth import authenticate
from api.body import read_json
from api.errors import ApiError
from api.event_stream import EventsQuery, event_stream_response
from api.openai_format import Completion, error_body
from api.streams import (
    REPLAYED_HEADER,
    admit_generation,
    idempotency_key_of,
    idempotency_of,
    record_generation,
    services_of,
    take_connection_slot,
)
from api.transcode import parse_frames
from api.watch import watch_frames
from broker.errors import StoreUnavailable
from broker.state import GenerationState


async def chat_completions(request: Request) -> Response:
    """Admission comes first, whole: auth, body, model and the tenant's connection limit
    are all checked before the generation is recorded, so a refused request (a 429 the SDK
    retries, say) leaves no generation running unseen behind it."""
    services = services_of(request)
    try:
        caller = authenticate(request, services.settings.api)
        idempotency_key = idempotency_key_of(request)
        body = await read_json(request, max_bytes=services.settings.api.max_body_bytes)
        streamed = isinstance(body, dict) and body.get("stream") is True
        options = body.get("stream_options") if isinstance(body, dict) else None
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        state = await admit_generation(request, caller, body)
        # Both kinds hold a connection for the whole generation: count both.
        slot = await take_connection_slot(services, state.tenant)
        idempotency = idempotency_of(request, state.tenant, idempotency_key, body)
        try:
            created = await record_generation(request, state, idempotency)
        except BaseException:
            await slot.give_back()
            raise
        # A replay answers the first create's generation in full: from its first event, or
        # its whole completion (the client never got, or lost, the first answer).
        state = created.state
        if streamed:
            query = EventsQuery(wire="openai", include_usage=include_usage)
            response = await event_stream_response(request, caller, state.id, query, slot=slot)
        else:
            try:
                response = await _complete(request, state)
            finally:
                await slot.give_back()
        if created.replayed:
            response.headers[REPLAYED_HEADER] = "true"
        return response
    except ApiError as exc:
        return openai_error(exc.status, exc.code, exc.message, exc.headers)
    except StoreUnavailable as exc:
        return openai_error(503, "store_unavailable", str(exc), {"Retry-After": "1"})


async def _complete(request: Request, state: GenerationState) -> Response:
    """``stream: false``: follow the generation to its end, then answer it whole.

    A client that leaves stops the following (its hub subscription goes with it); the
    generation itself runs on and can be read from its stream."""
    services = services_of(request)
    completion = Completion(state.id, state.model, state.created_at_ms // 1000)
    ended = False

    async def follow() -> None:
        nonlocal ended
        frames = watch_frames(services.log, services.hub, state.id, 0, tail_seq=0)
        async with aclosing(frames):
            async for chunk in frames:
                for _, event_type, data in parse_frames(chunk):
                    completion.add(event_type, data)
                    ended = ended or event_type in ("done", "error")

    if not await _unless_disconnected(request, follow()):
        # Nobody will read this answer; the status is for the access log.
        return Response(status_code=499)
    headers = {"x-stream-id": state.id}
    if completion.error is not None:
        error = completion.error
        code = str(error.get("code", "error"))
        retryable = bool(error.get("retryable"))
        return openai_error(
            failed_status(code, retryable=retryable),
            code,
            str(error.get("message", "")),
            {**headers, "x-should-retry": "true" if retryable else "false"},
        )
    if not ended:
        # The watch ended without the terminal event (shutdown, Redis gone): the answer is
        # still being made and can be read from the stream.
        return openai_error(
            503,
            "incomplete",
            f"the answer of stream {state.id} could not be awaited here; read it from "
            f"/v1/streams/{state.id}",
            {**headers, "x-should-retry": "false"},
        )
    return JSONResponse(completion.body(), headers=headers)


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, None]) -> bool:
    """Run ``work`` until it ends (True) or the client disconnects (False; ``work`` is
    cancelled). The body was read already, so the next ASGI message is the disconnect."""
    async with anyio.create_task_group() as group:
        finished = False

        async def run_work() -> None:
            nonlocal finished
            await work
            finished = True
            group.cancel_scope.cancel()

        async def watch_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(run_work)
        group.start_soon(watch_disconnect)
    return finished


#: The status of a ``stream: false`` answer whose generation failed for good, by the
#: broker's error code, where the cause lies in the request itself. Clients that do not
#: read ``x-should-retry`` (the AI SDK) retry every 5xx: each retry would be a new
#: generation failing the same way.
FAILED_REQUEST_STATUS = {
    "upstream_bad_request": 400,
    "upstream_not_found": 404,
    "unroutable_model": 422,
    "fake_failure": 422,  # the request asked for it (fail_after_tokens)
}


def failed_status(code: str, *, retryable: bool) -> int:
    """503 for a failure worth retrying; else the request's fault where it is (a 4xx), or
    500 for what the operator must fix (an upstream refusing the broker's key, say)."""
    if retryable:
        return 503
    return FAILED_REQUEST_STATUS.get(code, 500)


def openai_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    headers = dict(headers or {})
    if status < 500 and status != 429:
        headers.setdefault("x-should-retry", "false")  # the same request fails the same way
    return JSONResponse(error_body(status, code, message), status_code=status, headers=headers)


routes: list[Any] = [Route("/v1/chat/completions", chat_completions, methods=["POST"])]
