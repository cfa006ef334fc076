"""``GET /v1/models``: the models this broker routes, in the OpenAI list shape."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.auth import authenticate
from broker.routing import route_model


async def list_models(request: Request) -> Response:
    services = request.app.state.services
    authenticate(request, services.settings.api)
    routes = services.settings.generation.routes
    names = await services.catalog.list_models()
    data = [
        {
            "id": name,
            "object": "model",
            # OpenAI's creation time of the model; the broker knows none, and 0 is what
            # OpenAI-compatible servers that do not know it send (clients require the field).
            "created": 0,
            "owned_by": "streambroker",
            "provider": route_model(name, routes),
        }
        for name in names
    ]
    return JSONResponse({"object": "list", "data": data})


routes = [Route("/v1/models", list_models, methods=["GET"])]
