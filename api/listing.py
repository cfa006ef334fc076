"""``GET /v1/streams``: recorded generations, newest first, with filters and a cursor."""

from __future__ import annotations

from datetime import datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.auth import authenticate
from api.errors import ApiError
from api.services import Services
from broker.listing import Cursor, InvalidCursor, StreamFilter, list_streams
from broker.numbers import InvalidNumber, parse_int
from broker.state import Status

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
_PLAIN = {"limit", "cursor", "status", "model", "created_after", "created_before"}


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def _epoch_ms(name: str, raw: str) -> int:
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise _invalid(f"{name}: expected an RFC 3339 time such as 2026-11-21T14:53:31Z") from None
    if moment.tzinfo is None:
        raise _invalid(f"{name}: give a time zone (Z for UTC)")
    return int(moment.timestamp() * 1000)


def _limit(raw: str | None) -> int:
    """ASCII digits only (``broker.numbers``), from 1 to ``MAX_LIMIT``."""
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = parse_int(raw, max_digits=len(str(MAX_LIMIT)))
    except InvalidNumber:
        limit = 0  # refused below, with the same message
    if not 1 <= limit <= MAX_LIMIT:
        raise _invalid(f"limit: expected a whole number from 1 to {MAX_LIMIT}")
    return limit


def parse_query(request: Request) -> tuple[int, Cursor | None, StreamFilter]:
    params = request.query_params
    for name in params:
        if name not in _PLAIN and not name.startswith("metadata."):
            raise _invalid(f"{name}: not a filter of this listing")
    limit = _limit(params.get("limit"))
    cursor = None
    if "cursor" in params:
        try:
            cursor = Cursor.decode(params["cursor"])
        except InvalidCursor as exc:
            raise ApiError(400, "invalid_cursor", str(exc)) from None
    status = None
    if "status" in params:
        try:
            status = Status(params["status"])
        except ValueError:
            choices = ", ".join(s.value for s in Status)
            raise _invalid(f"status: expected one of {choices}") from None
    where = StreamFilter(
        status=status,
        model=params.get("model"),
        metadata={
            name.removeprefix("metadata."): value
            for name, value in params.items()
            if name.startswith("metadata.")
        },
        created_after_ms=(
            _epoch_ms("created_after", params["created_after"])
            if "created_after" in params
            else None
        ),
        created_before_ms=(
            _epoch_ms("created_before", params["created_before"])
            if "created_before" in params
            else None
        ),
    )
    return limit, cursor, where


async def list_streams_route(request: Request) -> Response:
    services: Services = request.app.state.services
    caller = authenticate(request, services.settings.api)
    limit, cursor, where = parse_query(request)
    states, next_cursor = await list_streams(
        services.log, tenant=caller.tenant, limit=limit, cursor=cursor, where=where
    )
    return JSONResponse(
        {
            "object": "list",
            "data": [state.to_api(include_text=False) for state in states],
            "next_cursor": next_cursor.encode() if next_cursor is not None else None,
        }
    )


routes = [Route("/v1/streams", list_streams_route, methods=["GET"])]
