"""The ``/v1/streams`` endpoints: create, read state, cancel (watching is ``api.event_stream``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.access_log import note
from api.auth import Caller, authenticate, read_token
from api.body import read_json
from api.errors import ApiError, not_found
from api.services import Services
from broker import keys, metrics, structured_logs
from broker.creation import Created, Idempotency, IdempotencyKeyReused
from broker.request import InvalidRequest, parse_create_body
from broker.routing import route_model
from broker.state import GenerationState, Status, is_stream_id, iso_ms, new_stream_id, now_ms


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def stream_id_of(request: Request) -> str:
    stream_id: str = request.path_params["stream_id"]
    if not is_stream_id(stream_id):
        raise not_found(stream_id)
    return stream_id


async def create_stream(request: Request) -> Response:
    services = services_of(request)
    settings = services.settings
    caller = authenticate(request, settings.api)  # before the body: 401 wins over 400
    idempotency_key = idempotency_key_of(request)
    body = await read_json(request, max_bytes=settings.api.max_body_bytes)
    created = await start_generation(request, caller, body, idempotency_key)
    state = created.state
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
    headers = {"Location": url}
    if created.replayed:
        headers[REPLAYED_HEADER] = "true"
    return JSONResponse(answer, status_code=200 if created.replayed else 201, headers=headers)


async def start_generation(
    request: Request, caller: Caller, body: Any, idempotency_key: str | None = None
) -> Created:
    """Validate a create body (``POST /v1/streams`` and ``/v1/chat/completions`` alike),
    record the generation and queue its job; ``ApiError`` for anything refused. With an
    ``Idempotency-Key``, a repeated create answers the generation the first one made."""
    state = await admit_generation(request, caller, body)
    idempotency = idempotency_of(request, state.tenant, idempotency_key, body)
    return await record_generation(request, state, idempotency)


#: Longest ``Idempotency-Key`` taken: a UUID is 36 characters; Stripe allows 255.
MAX_IDEMPOTENCY_KEY_LENGTH = 255
#: Marks the answer to a create that an earlier one with the same key already made.
REPLAYED_HEADER = "Idempotent-Replayed"


def idempotency_key_of(request: Request) -> str | None:
    """The request's ``Idempotency-Key``: printable ASCII without spaces, 1 to 255
    characters, bare (as Stripe takes it) or as a quoted structured-field string (as the
    IETF draft writes it); ``ApiError`` 400 for anything else, before the body is read."""
    sent = request.headers.getlist("idempotency-key")
    if not sent:
        return None
    if len(sent) > 1:
        raise ApiError(
            400, "invalid_idempotency_key", "send one Idempotency-Key header, not several"
        )
    key = sent[0].strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH or not all("!" <= c <= "~" for c in key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII "
            "characters without spaces (a UUID is a good one)",
        )
    return key


def idempotency_of(request: Request, tenant: str, key: str | None, body: Any) -> Idempotency | None:
    """Where the tenant's key is kept, and the fingerprint of what it asks: the endpoint and
    the body as JSON with sorted keys and whole numbers written alike, so the same request
    sent again matches even when a client serialises it differently, and the same key on
    another request does not."""
    if key is None:
        return None
    canonical = json.dumps(
        _same_numbers(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    digest = hashlib.sha256(f"{request.url.path}\n{canonical}".encode()).hexdigest()
    return Idempotency(keys.idempotency_key(tenant, key), digest)


def _same_numbers(value: Any) -> Any:
    """``value`` with every whole float as an int: ``1.0`` and ``1`` are one JSON number,
    spelt differently by different clients (Python writes ``1.0``, JavaScript ``1``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _same_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_same_numbers(item) for item in value]
    return value


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


async def record_generation(
    request: Request, state: GenerationState, idempotency: Idempotency | None = None
) -> Created:
    """Record an admitted generation and queue its job, or answer the one an earlier create
    with the same idempotency key made (422 when that key was used for another request)."""
    services = services_of(request)
    try:
        created = await services.log.create(state, idempotency)
    except IdempotencyKeyReused as exc:
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"this Idempotency-Key was used for another request (stream {exc.stream_id}) "
            "within the last 24 h; send a new key with a new request",
        ) from exc
    state = created.state
    note(request.scope, stream_id=state.id)
    provider = route_model(state.model, services.settings.generation.routes)
    if created.replayed:
        structured_logs.step("create replayed", state.id, tenant=state.tenant or None)
        return created
    metrics.STREAMS_CREATED.inc()
    structured_logs.step(
        "created", state.id, tenant=state.tenant or None, model=state.model, provider=provider
    )
    return created


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
    state = await services.log.get(stream_id_of(request))
    caller.check(state)
    note(request.scope, tenant=state.tenant or None)
    return JSONResponse(state.to_api())


async def cancel_stream(request: Request) -> Response:
    services = services_of(request)
    caller = authenticate(request, services.settings.api)
    stream_id = stream_id_of(request)
    if caller.tenant is not None:
        caller.check(await services.log.get(stream_id))
    status = await services.log.request_cancel(stream_id)
    ended_here = False
    if status is Status.QUEUED:
        # No worker has it yet (they may all be busy): end it now rather than when one is free.
        ended_here = await services.log.cancel_queued(stream_id)
    elif status is Status.RUNNING:
        # A continuation waiting for a worker (maybe none is running) is ended the same way.
        pending = (await services.log.get(stream_id)).pending_continuation
        if pending is not None:
            ended_here = await services.log.cancel_queued(stream_id, continuation=pending)
    state = await services.log.get(stream_id)
    fields: dict[str, Any] = {
        "tenant": state.tenant or None,
        "model": state.model,
        "attempt": state.attempt,
    }
    structured_logs.step("cancel_requested", stream_id, was_status=status.value, **fields)
    if ended_here:
        structured_logs.step(
            "finished", stream_id, status="cancelled", finish_reason="cancelled", **fields
        )
    return JSONResponse(state.to_api(), status_code=200 if status.terminal else 202)


routes = [
    Route("/v1/streams", create_stream, methods=["POST"]),
    Route("/v1/streams/{stream_id}", get_stream, methods=["GET"]),
    Route("/v1/streams/{stream_id}/cancel", cancel_stream, methods=["POST"]),
]
