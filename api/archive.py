"""``GET /v1/streams/{id}/export`` and ``POST /v1/streams/import``: one generation as JSON
lines (``broker.archive`` documents the format), to move or keep recorded streams."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from api.auth import authenticate
from api.errors import ApiError, not_found
from api.services import Services
from broker.archive import AlreadyExists, ArchiveError, export_lines, import_lines
from broker.state import is_stream_id

#: Largest file an import accepts (a long generation with its progress events is far less).
MAX_IMPORT_BYTES = 64 * 1024 * 1024
NDJSON = "application/x-ndjson"


async def export_stream(request: Request) -> Response:
    services: Services = request.app.state.services
    caller = authenticate(request, services.settings.api, token_ok=True)
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
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_IMPORT_BYTES:
                raise ApiError(
                    413, "body_too_large", f"an import is at most {MAX_IMPORT_BYTES} bytes"
                )
    except ClientDisconnect as exc:
        raise ApiError(400, "client_disconnected", "the client went away mid-body") from exc
    try:
        lines = body.decode("utf-8").splitlines()
        stream_id = await import_lines(services.log, lines, tenant=caller.tenant)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_archive", "the file is not UTF-8 text") from None
    except AlreadyExists as exc:
        raise ApiError(409, "stream_exists", str(exc)) from None
    except ArchiveError as exc:
        raise ApiError(400, "invalid_archive", str(exc)) from None
    url = f"/v1/streams/{stream_id}"
    return JSONResponse(
        {"id": stream_id, "url": url, "events_url": f"{url}/events"},
        status_code=201,
        headers={"Location": url},
    )


routes = [
    Route("/v1/streams/import", import_stream, methods=["POST"]),
    Route("/v1/streams/{stream_id}/export", export_stream, methods=["GET"]),
]
