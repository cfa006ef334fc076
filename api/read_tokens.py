"""``POST /v1/streams/{id}/read_token``: a read token for an existing stream, for its tenant.

The create answer carries a read token, but only for the client that created the stream. An
operator (the console, a support tool) holding the tenant's API key needs one for any of the
tenant's streams, because a browser ``EventSource`` cannot send an ``Authorization`` header:
it watches with ``?token=`` instead, and the API key itself never goes into a URL (where
access logs and history would keep it). A read token cannot mint another one, and another
tenant's stream answers 404, as everywhere else.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.auth import authenticate, read_token
from api.errors import not_found
from api.services import Services
from broker import read_token_signing
from broker.state import is_stream_id, iso_ms


async def issue_read_token(request: Request) -> Response:
    services: Services = request.app.state.services
    settings = services.settings.api
    caller = authenticate(request, settings)  # an API key; a read token is refused
    stream_id: str = request.path_params["stream_id"]
    if not is_stream_id(stream_id):
        raise not_found(stream_id)
    caller.check(await services.log.get(stream_id))
    token = read_token(settings, stream_id)
    if token is None:
        # Auth is off: the stream is readable without a token. Same shape, so a client has
        # one code path: no token means "no token needed".
        return JSONResponse({"read_token": None, "expires_at": None})
    # The expiry written in the token, not a second clock read.
    expires = read_token_signing.expiry(token)
    return JSONResponse({"read_token": token, "expires_at": iso_ms(expires * 1000)})


routes = [Route("/v1/streams/{stream_id}/read_token", issue_read_token, methods=["POST"])]
