"""``GET /v1/streams/{id}/events``: one watcher's event stream, from its resume point, in the
wire format it asks for.

The route checks the resume point against the stream's state first (204 when the client
has it all, 410 when it holds events the log does not), takes a connection slot, then
builds the body: the broker's frames (``api.watch``, or ``api.replay`` at a speed),
re-framed for the OpenAI and AI SDK formats (``api.transcode``), sent by
``api.sse.EventStreamResponse``. ``POST /v1/chat/completions`` answers ``stream: true`` with
the same response (``event_stream_response``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api import ai_sdk_format
from api.access_log import BYTES_WRITTEN_DIRECTLY, note
from api.auth import Caller, authenticate
from api.errors import ApiError
from api.live_writes import DirectWrites
from api.openai_format import openai_chunks
from api.replay import parse_speed, replay_frames
from api.resume import ResumePoint, resume_point
from api.services import Services
from api.sse import HEARTBEAT_EVENT, PING, EventStreamResponse, Frames, pings_as_events
from api.streams import ConnectionSlot, services_of, stream_id_of, take_connection_slot
from api.transcode import ChunkEncoder, transcode
from api.watch import Delivery, watch_frames
from broker import metrics
from broker.state import GenerationState

#: The wire formats of ``?format=``.
FORMATS = ("broker", "openai", "ai-sdk")


@dataclass(frozen=True)
class EventsQuery:
    """What a watcher asked for: where it resumes, and how the events are to be sent."""

    resume: ResumePoint = field(default_factory=ResumePoint)
    wire: str = "broker"
    #: ``openai`` format: the usage chunk (``stream_options.include_usage``).
    include_usage: bool = False
    #: ``broker`` format: heartbeats as ``heartbeat`` events rather than comments.
    heartbeat_events: bool = False
    #: ``?replay=<speed>``: recorded events at their pacing scaled by this.
    speed: float | None = None


def events_query(request: Request) -> EventsQuery:
    """The query (and ``Last-Event-ID``) of an events request, checked: 400 for anything
    malformed or contradictory."""
    params = request.query_params
    wire = params.get("format", "broker")
    if wire not in FORMATS:
        raise ApiError(
            400,
            "invalid_request",
            f"format: must be one of {', '.join(FORMATS)}, not {wire[:40]!r}",
        )
    heartbeat = params.get("heartbeat", "comment")
    if heartbeat not in ("comment", "event"):
        raise ApiError(
            400, "invalid_request", f"heartbeat: must be comment or event, not {heartbeat[:40]!r}"
        )
    if heartbeat == "event" and wire != "broker":
        # A `heartbeat` event is not a chunk: OpenAI's and the AI SDK's clients would fail on it.
        raise ApiError(
            400, "invalid_request", f"heartbeat: event is only for the broker's format, not {wire}"
        )
    replay = params.get("replay")
    return EventsQuery(
        resume=resume_point(request, sub_ids=wire != "broker"),
        wire=wire,
        include_usage=params.get("include_usage", "").lower() in ("1", "true"),
        heartbeat_events=heartbeat == "event",
        speed=parse_speed(replay) if replay is not None else None,
    )


async def stream_events(request: Request) -> Response:
    services = services_of(request)
    caller = authenticate(request, services.settings.api, token_ok=True)
    stream_id = stream_id_of(request)
    return await event_stream_response(request, caller, stream_id, events_query(request))


async def event_stream_response(
    request: Request,
    caller: Caller,
    stream_id: str,
    query: EventsQuery,
    *,
    slot: ConnectionSlot | None = None,
) -> Response:
    """The SSE answer for one watcher: 204, 410 or a stream of the broker's events.

    ``slot``: the connection slot the caller took already (a create that streams takes it
    before it creates anything); the response owns it from then on. Without one, a slot is
    taken here once the stream is known to have something to send."""
    try:
        response = await _event_stream_response(request, caller, stream_id, query, slot)
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
    query: EventsQuery,
    slot: ConnectionSlot | None,
) -> Response:
    services = services_of(request)
    resume = query.resume
    state = await services.log.open_watch(stream_id, resumed=resume.resumed, tenant=caller.tenant)
    caller.check(state)
    note(
        request.scope,
        tenant=state.tenant or None,
        resumed_from=str(resume) if resume.resumed else None,
    )
    if _has_it_all(state, resume):
        # Tells a browser EventSource to stop reconnecting: there is nothing more to send.
        return Response(status_code=204)
    held = slot if slot is not None else await take_connection_slot(services, state.tenant)
    try:
        encoder = await _encoder(services, state, query)
    except BaseException:
        if slot is None:
            await held.give_back()  # a slot passed in is the caller's to give back
        raise
    metrics.EVENT_CONNECTIONS.inc()
    if resume.resumed:
        metrics.RESUMES.inc()
    delivery = Delivery(last_id=resume.after)

    async def on_close() -> None:
        metrics.EVENT_CONNECTIONS.dec()
        note(
            request.scope,
            events=delivery.events,
            last_event_id=delivery.last_id,
            terminal=delivery.ended,
            **{BYTES_WRITTEN_DIRECTLY: delivery.live_bytes},
        )
        await held.give_back()

    # Live writes (api.live_writes) carry the broker's own frames only: the other formats
    # are encoded per client.
    direct = (
        DirectWrites(
            ping=HEARTBEAT_EVENT if query.heartbeat_events else PING,
            hold_end=held.slot is not None,
        )
        if query.wire == "broker" and query.speed is None
        else None
    )
    frames = _broker_frames(services, state, query, delivery, direct)
    api = services.settings.api
    headers = {"x-stream-id": stream_id, "x-heartbeat-seconds": f"{api.heartbeat_seconds:g}"}
    if encoder is not None:
        frames = transcode(frames, encoder, resume)
    elif query.heartbeat_events:
        frames = pings_as_events(frames)
    if query.wire == "ai-sdk":
        headers.update(ai_sdk_format.HEADERS)
    return EventStreamResponse(
        frames,
        # Clients time a silent connection out after a little more than this (broker.client).
        headers=headers,
        retry_ms=api.retry_ms,
        send_timeout=api.send_timeout_seconds,
        on_close=on_close,
        ending=lambda: delivery.ended,
        direct=direct,
    )


def _has_it_all(state: GenerationState, resume: ResumePoint) -> bool:
    """True when the client holds the whole of a finished stream; 410 when it holds an
    event the log does not (lost, or never sent); False when there is more to send.

    The loss checks come before the 204: an id at or past ``lost_from_seq`` may be one the
    client received on a timeline the store lost (a crash, a failover), and the event the
    log now has under it (a sweeper's terminal event, say) is not the one the client holds.
    So a resume point there is 410 even when it equals the last id of a finished stream,
    and one beyond the last event the store holds is 410 whatever the status: a 204 would
    tell the client it has the whole stream."""
    # The last event the client holds (some of): with ``<n>.<k>``, frames of event n + 1.
    holds = resume.after + 1 if resume.skip else resume.after
    lost = state.lost_from_seq
    if lost is not None and holds >= lost:
        raise _log_lost(state.id, holds, min(lost - 1, state.last_seq))
    if state.status.terminal and holds == state.last_seq and not resume.skip:
        return True
    if holds > state.last_seq:
        # The log does not have the client's id: it lost it, or never sent it. Waiting for
        # that id would skip what comes before it, and continuing would put other text
        # under ids the client has.
        raise _log_lost(state.id, holds, state.last_seq)
    return False


def _broker_frames(
    services: Services,
    state: GenerationState,
    query: EventsQuery,
    delivery: Delivery,
    direct: DirectWrites | None,
) -> Frames:
    """The broker's own frames from the resume point: live, or replayed at a speed."""
    if query.speed is not None:
        return replay_frames(
            services.log,
            services.hub,
            state.id,
            query.resume.after,
            speed=query.speed,
            heartbeat_seconds=services.settings.api.heartbeat_seconds,
            delivery=delivery,
        )
    return watch_frames(
        services.log,
        services.hub,
        state.id,
        query.resume.after,
        tail_seq=state.last_seq,
        delivery=delivery,
        direct=direct,
        reads=services.catch_up,
    )


async def _encoder(
    services: Services, state: GenerationState, query: EventsQuery
) -> ChunkEncoder | None:
    """The ``ChunkEncoder`` of the asked format (None: the broker's own frames), brought to
    where the client resumes: a stateful one is fed the events up to the resume point."""
    encoder: ChunkEncoder
    if query.wire == "openai":
        encoder = openai_chunks(state, query.include_usage)
    elif query.wire == "ai-sdk":
        encoder = ai_sdk_format.UIMessageChunks(state.id)
    else:
        return None
    after = query.resume.after
    cursor = 0
    while encoder.stateful and cursor < after:
        events = await services.log.read(state.id, cursor, count=min(512, after - cursor))
        if not events:
            break
        encoder.replay(e for e in events if e.seq <= after)
        cursor = events[-1].seq
    return encoder


def _log_lost(stream_id: str, after: int, kept: int) -> ApiError:
    """Loss is never silent: the client holds events the log does not (Redis lost them
    after they were sent, in a crash before they reached disk; or the id was never sent)."""
    return ApiError(
        410,
        "log_lost",
        f"stream {stream_id} has no event {after} any more (the log keeps events up to "
        f"{kept} of what was sent): the store lost later ones, or that id was never sent. "
        "Discard what you received after that id, or retry the request",
    )


routes = [Route("/v1/streams/{stream_id}/events", stream_events, methods=["GET"])]
