"""The ``/v1/streams`` endpoints: create, read state, watch/resume events, cancel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api import ai_sdk_format
from api.access_log import note
from api.auth import Caller, authenticate, read_token
from api.body import read_json
from api.errors import ApiError, not_found
from api.openai_format import openai_chunks
from api.replay import parse_speed, replay_frames
from api.resume import ResumePoint, resume_point
from api.services import Services
from api.sse import EventStreamResponse, Frames, event_stream_body, pings_as_events
from api.transcode import ChunkEncoder, transcode
from api.watch import Delivery, watch_frames
from broker import logs, metrics
from broker.request import InvalidRequest, parse_create_body
from broker.routing import route_model
from broker.state import GenerationState, Status, is_stream_id, iso_ms, new_stream_id, now_ms


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _stream_id(request: Request) -> str:
    stream_id: str = request.path_params["stream_id"]
    if not is_stream_id(stream_id):
        raise not_found(stream_id)
    return stream_id


async def create_stream(request: Request) -> Response:
    services = services_of(request)
    settings = services.settings
    caller = authenticate(request, settings.api)  # before the body: 401 wins over 400
    body = await read_json(request, max_bytes=settings.api.max_body_bytes)
    state = await start_generation(request, caller, body)
    url = f"/v1/streams/{state.id}"
    answer = {
        "id": state.id,
        "object": "stream",
        "status": state.status.value,
        "model": state.model,
        "created_at": iso_ms(state.created_at_ms),
        "url": url,
        "events_url": f"{url}/events",
    }
    token = read_token(settings.api, state.id)
    if token is not None:
        answer["read_token"] = token
    return JSONResponse(answer, status_code=201, headers={"Location": url})


async def start_generation(request: Request, caller: Caller, body: Any) -> GenerationState:
    """Validate a create body (``POST /v1/streams`` and ``/v1/chat/completions`` alike),
    record the generation and queue its job; ``ApiError`` for anything refused."""
    state = await admit_generation(request, caller, body)
    await record_generation(request, state)
    return state


async def admit_generation(request: Request, caller: Caller, body: Any) -> GenerationState:
    """The generation a create body asks for, checked but not recorded: ``ApiError`` for a
    body or model that is refused. Nothing is written, so a caller may still refuse it for
    another reason (a limit) and leave no trace."""
    services = services_of(request)
    settings = services.settings
    model = body.get("model") if isinstance(body, dict) else None
    provider = route_model(model, settings.generation.routes) if isinstance(model, str) else None
    try:
        generation = parse_create_body(
            body,
            fake_model=provider == "fake",
            max_messages=settings.api.max_messages,
            max_tokens_limit=settings.api.max_tokens_limit,
            fake_default_tokens=settings.generation.default_max_tokens,
        )
    except InvalidRequest as exc:
        raise ApiError(400, "invalid_request", str(exc)) from exc
    if provider is None or not await services.catalog.is_known(generation.model):
        raise ApiError(
            422,
            "unknown_model",
            f"model {generation.model!r} is not served here; GET /v1/models lists the models",
        )
    return GenerationState(
        id=new_stream_id(),
        model=generation.model,
        status=Status.QUEUED,
        created_at_ms=now_ms(),
        request=generation.to_dict(),
        metadata=generation.metadata,
        tenant=caller.tenant or "",
    )


async def record_generation(request: Request, state: GenerationState) -> None:
    """Record an admitted generation and queue its job (one transaction)."""
    services = services_of(request)
    await services.log.create(state)
    metrics.STREAMS_CREATED.inc()
    note(request.scope, stream_id=state.id)
    provider = route_model(state.model, services.settings.generation.routes)
    logs.step(
        "created", state.id, tenant=state.tenant or None, model=state.model, provider=provider
    )


@dataclass
class ConnectionSlot:
    """A tenant's event connection held under ``BROKER_MAX_CONNECTIONS_PER_TENANT`` (a no-op
    when there is no limit); given back once, by whoever ends up owning it."""

    services: Services
    tenant: str = ""
    slot: str | None = None

    async def give_back(self) -> None:
        slot, self.slot = self.slot, None
        if slot is not None:
            await self.services.slots.give_back(self.tenant, slot)


async def take_connection_slot(services: Services, tenant: str) -> ConnectionSlot:
    """One more event connection for ``tenant``, or 429 when it holds its limit already."""
    if not services.slots.enabled or not tenant:
        return ConnectionSlot(services)
    slot = await services.slots.take(tenant)
    if slot is None:
        limit = services.settings.api.max_connections_per_tenant
        raise ApiError(
            429,
            "too_many_connections",
            f"this tenant already has {limit} open event connections "
            "(BROKER_MAX_CONNECTIONS_PER_TENANT); close one and retry",
            headers={"Retry-After": "1"},
        )
    return ConnectionSlot(services, tenant, slot)


async def get_stream(request: Request) -> Response:
    services = services_of(request)
    caller = authenticate(request, services.settings.api, token_ok=True)
    state = await services.log.get(_stream_id(request))
    caller.check(state)
    note(request.scope, tenant=state.tenant or None)
    return JSONResponse(state.to_api())


#: The wire formats of ``GET /v1/streams/{id}/events?format=``.
FORMATS = ("broker", "openai", "ai-sdk")


async def stream_events(request: Request) -> Response:
    services = services_of(request)
    caller = authenticate(request, services.settings.api, token_ok=True)
    stream_id = _stream_id(request)
    wire = request.query_params.get("format", "broker")
    if wire not in FORMATS:
        raise ApiError(
            400,
            "invalid_request",
            f"format: must be one of {', '.join(FORMATS)}, not {wire[:40]!r}",
        )
    resume = resume_point(request, sub_ids=wire != "broker")
    replay = request.query_params.get("replay")
    speed = parse_speed(replay) if replay is not None else None
    include_usage = request.query_params.get("include_usage", "").lower() in ("1", "true")
    heartbeat = request.query_params.get("heartbeat", "comment")
    if heartbeat not in ("comment", "event"):
        raise ApiError(
            400, "invalid_request", f"heartbeat: must be comment or event, not {heartbeat[:40]!r}"
        )
    if heartbeat == "event" and wire != "broker":
        # A `heartbeat` event is not a chunk: OpenAI's and the AI SDK's clients would fail on it.
        raise ApiError(
            400, "invalid_request", f"heartbeat: event is only for the broker's format, not {wire}"
        )
    return await event_stream_response(
        request,
        caller,
        stream_id,
        resume,
        speed=speed,
        wire=wire,
        include_usage=include_usage,
        heartbeat_events=heartbeat == "event",
    )


async def event_stream_response(
    request: Request,
    caller: Caller,
    stream_id: str,
    resume: ResumePoint,
    *,
    speed: float | None = None,
    wire: str = "broker",
    include_usage: bool = False,
    heartbeat_events: bool = False,
    slot: ConnectionSlot | None = None,
) -> Response:
    """The SSE answer for one watcher from ``resume``: 204, 410 or a stream of the broker's
    events in format ``wire`` (``FORMATS``).

    ``slot``: the connection slot the caller took already (a create that streams takes it
    before it creates anything); the response owns it from then on. Without one, a slot is
    taken here once the stream is known to have something to send."""
    try:
        response = await _event_stream_response(
            request,
            caller,
            stream_id,
            resume,
            speed=speed,
            wire=wire,
            include_usage=include_usage,
            heartbeat_events=heartbeat_events,
            slot=slot,
        )
    except BaseException:
        if slot is not None:
            await slot.give_back()
        raise
    if slot is not None and not isinstance(response, EventStreamResponse):
        await slot.give_back()  # a 204: nothing to stream, nothing to hold
    return response


async def _event_stream_response(
    request: Request,
    caller: Caller,
    stream_id: str,
    resume: ResumePoint,
    *,
    speed: float | None,
    wire: str,
    include_usage: bool,
    heartbeat_events: bool,
    slot: ConnectionSlot | None,
) -> Response:
    services = services_of(request)
    after = resume.after
    state = await services.log.open_watch(stream_id, resumed=resume.resumed, tenant=caller.tenant)
    caller.check(state)
    note(
        request.scope,
        tenant=state.tenant or None,
        resumed_from=str(resume) if resume.resumed else None,
    )
    # The last event the client holds (some of): with ``<n>.<k>``, frames of event n + 1.
    holds = after + 1 if resume.skip else after
    lost = state.lost_from_seq
    if lost is not None and holds >= lost:
        raise _log_lost(stream_id, holds, min(lost - 1, state.last_seq))
    if state.status.terminal and holds == state.last_seq and not resume.skip:
        # Tells a browser EventSource to stop reconnecting: there is nothing more to send.
        return Response(status_code=204)
    if holds > state.last_seq:
        # A live log that does not have the client's id lost it (or never sent it): waiting
        # for that id would skip what comes before it, and continuing would put other text
        # under ids the client has.
        raise _log_lost(stream_id, holds, state.last_seq)
    api = services.settings.api
    held = slot if slot is not None else await take_connection_slot(services, state.tenant)
    try:
        encoder = await _encoder(services, state, wire, resume, include_usage=include_usage)
    except BaseException:
        if slot is None:
            await held.give_back()  # a slot passed in is the caller's to give back
        raise
    metrics.EVENT_CONNECTIONS.inc()
    if resume.resumed:
        metrics.RESUMES.inc()
    delivery = Delivery(last_id=after)

    async def on_close() -> None:
        metrics.EVENT_CONNECTIONS.dec()
        note(
            request.scope,
            events=delivery.events,
            last_event_id=delivery.last_id,
            terminal=delivery.ended,
        )
        await held.give_back()

    frames: Frames
    if speed is not None:
        frames = replay_frames(
            services.log,
            services.hub,
            stream_id,
            after,
            speed=speed,
            heartbeat_seconds=api.heartbeat_seconds,
            delivery=delivery,
        )
    else:
        frames = watch_frames(
            services.log,
            services.hub,
            stream_id,
            after,
            tail_seq=state.last_seq,
            delivery=delivery,
        )
    headers = {"x-stream-id": stream_id, "x-heartbeat-seconds": f"{api.heartbeat_seconds:g}"}
    if encoder is not None:
        frames = transcode(frames, encoder, resume)
    elif heartbeat_events:
        frames = pings_as_events(frames)
    if wire == "ai-sdk":
        headers.update(ai_sdk_format.HEADERS)
    return EventStreamResponse(
        event_stream_body(frames, api.retry_ms),
        # Clients time a silent connection out after a little more than this (broker.client).
        headers=headers,
        send_timeout=api.send_timeout_seconds,
        on_close=on_close,
    )


async def _encoder(
    services: Services,
    state: GenerationState,
    wire: str,
    resume: ResumePoint,
    *,
    include_usage: bool,
) -> ChunkEncoder | None:
    """The ``ChunkEncoder`` of format ``wire`` (None: the broker's own frames), brought to
    where the client resumes: fed the events up to ``resume.after``."""
    encoder: ChunkEncoder
    if wire == "openai":
        encoder = openai_chunks(state, include_usage)
    elif wire == "ai-sdk":
        encoder = ai_sdk_format.UIMessageChunks(state.id)
    else:
        return None
    cursor = 0
    while encoder.stateful and cursor < resume.after:
        events = await services.log.read(state.id, cursor, count=min(512, resume.after - cursor))
        if not events:
            break
        encoder.replay(e for e in events if e.seq <= resume.after)
        cursor = events[-1].seq
    return encoder


def _log_lost(stream_id: str, after: int, kept: int) -> ApiError:
    """Promise 7: the client holds events the log does not (Redis lost them after they were
    sent, in a crash before they reached disk; or the id was never sent). Say so."""
    return ApiError(
        410,
        "log_lost",
        f"stream {stream_id} has no event {after} any more (the log keeps events up to "
        f"{kept} of what was sent): the store lost later ones, or that id was never sent. "
        "Discard what you received after that id, or retry the request",
    )


async def cancel_stream(request: Request) -> Response:
    services = services_of(request)
    caller = authenticate(request, services.settings.api)
    stream_id = _stream_id(request)
    if caller.tenant is not None:
        caller.check(await services.log.get(stream_id))
    status = await services.log.request_cancel(stream_id)
    ended_here = False
    if status is Status.QUEUED:
        # No worker has it yet (they may all be busy): end it now rather than when one is free.
        ended_here = await services.log.cancel_queued(stream_id)
    state = await services.log.get(stream_id)
    fields: dict[str, Any] = {
        "tenant": state.tenant or None,
        "model": state.model,
        "attempt": state.attempt,
    }
    logs.step("cancel_requested", stream_id, was_status=status.value, **fields)
    if ended_here:
        logs.step("finished", stream_id, status="cancelled", finish_reason="cancelled", **fields)
    return JSONResponse(state.to_api(), status_code=200 if status.terminal else 202)


routes = [
    Route("/v1/streams", create_stream, methods=["POST"]),
    Route("/v1/streams/{stream_id}", get_stream, methods=["GET"]),
    Route("/v1/streams/{stream_id}/events", stream_events, methods=["GET"]),
    Route("/v1/streams/{stream_id}/cancel", cancel_stream, methods=["POST"]),
]
