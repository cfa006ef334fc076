"""``GET /v1/streams/{id}/export`` and ``POST /v1/streams/import``: one generation as JSON
lines (``broker.archive`` documents the format and what an import accepts), to move or keep
recorded streams.

Both need the tenant's API key when auth is on: an export holds what a read token must not
show (the stored request, with its prompts; the tenant; the worker's host). An import body
is streamed through ``broker.archive`` a line at a time, never held whole."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from api.auth import authenticate
from api.errors import ApiError, not_found
from api.services import Services
from broker.archive import ImportInterrupted, export_lines, import_lines, split_lines
from broker.archive_format import AlreadyExists, ArchiveError
from broker.numbers import int_or_none
from broker.state import is_stream_id

#: Largest file an import accepts (a long generation with its progress events is far less).
MAX_IMPORT_BYTES = 64 * 1024 * 1024
NDJSON = "application/x-ndjson"


async def export_stream(request: Request) -> Response:
    services: Services = request.app.state.services
    caller = authenticate(request, services.settings.api)  # a key: not a read token
    stream_id: str = request.path_params["stream_id"]
    if not is_stream_id(stream_id):
        raise not_found(stream_id)
    caller.check(await services.log.get(stream_id))
    return StreamingResponse(
        export_lines(services.log, stream_id),
        media_type=NDJSON,
        headers={"content-disposition": f'attachment; filename="{stream_id}.jsonl"'},
    )


async def import_stream(request: Request) -> Response:
    services: Services = request.app.state.services
    caller = authenticate(request, services.settings.api)
    # A malformed length is read_json's to refuse elsewhere; here the body's own size counts.
    declared = int_or_none(request.headers.get("content-length", "").strip(" \t"), max_digits=19)
    if declared is not None and declared > MAX_IMPORT_BYTES:
        raise _too_large()
    try:
        async with contextlib.aclosing(split_lines(_body(request))) as lines:
            stream_id = await import_lines(services.log, lines, tenant=caller.tenant)
    except ClientDisconnect as exc:
        raise ApiError(400, "client_disconnected", "the client went away mid-body") from exc
    except AlreadyExists as exc:
        raise ApiError(409, "stream_exists", str(exc)) from None
    except ArchiveError as exc:
        raise ApiError(400, "invalid_archive", str(exc)) from None
    except ImportInterrupted as exc:
        raise ApiError(
            503,
            "import_interrupted",
            f"{exc}: the upload was too slow, or Redis is short of memory; retry the import",
            headers={"Retry-After": "1"},
        ) from None
    url = f"/v1/streams/{stream_id}"
    return JSONResponse(
        {"id": stream_id, "url": url, "events_url": f"{url}/events"},
        status_code=201,
        headers={"Location": url},
    )


async def _body(request: Request) -> AsyncGenerator[bytes, None]:
    """The request body as it comes, up to ``MAX_IMPORT_BYTES`` (413 beyond: a chunked body
    has no Content-Length to check up front)."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_IMPORT_BYTES:
            raise _too_large()
        yield chunk


def _too_large() -> ApiError:
    return ApiError(413, "body_too_large", f"an import is at most {MAX_IMPORT_BYTES} bytes")


routes = [
    Route("/v1/streams/import", import_stream, methods=["POST"]),
    Route("/v1/streams/{stream_id}/export", export_stream, methods=["GET"]),
]
