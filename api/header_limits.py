"""Request-head limits, checked before any route runs.

uvicorn's httptools parser sets no bound of its own on the size of request headers; a client
could send megabytes of them on every request. This pure ASGI middleware answers 431 (in the
JSON error shape) when the headers together exceed ``BROKER_MAX_HEADER_BYTES``. It passes
``send`` through untouched, so event streams pay nothing per event for it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import error_response


class HeaderLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.max_bytes:
                response = error_response(
                    431,
                    "headers_too_large",
                    f"the request headers take {size} bytes; at most {self.max_bytes} are "
                    "accepted (BROKER_MAX_HEADER_BYTES)",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
