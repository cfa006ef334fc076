"""Every error answer in one shape: ``{"error": {"code": "<snake_case>", "message": "..."}}``.

Handlers registered by ``create_app`` turn ``ApiError``, Starlette's ``HTTPException`` (404
for an unknown path, 405 for a wrong method), the broker's own errors and anything unexpected
into that shape, so no client ever sees HTML, a traceback or an empty 500.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from broker.errors import ArchiveUnavailable, GenerationNotFound, StoreUnavailable

logger = logging.getLogger("streambroker.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "too_many_requests",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def not_found(stream_id: str) -> ApiError:
    return ApiError(
        404,
        "stream_not_found",
        f"no stream with id {stream_id!r} (it never existed, or it expired)",
    )


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, message, dict(exc.headers or {}))


async def handle_not_found(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GenerationNotFound)
    error = not_found(exc.stream_id)
    return error_response(error.status, error.code, error.message)


async def handle_store_unavailable(request: Request, exc: Exception) -> Response:
    store = "archive (PostgreSQL)" if isinstance(exc, ArchiveUnavailable) else "store (Redis)"
    logger.warning("%s unavailable during %s %s: %s", store, request.method, request.url.path, exc)
    return error_response(
        503,
        "store_unavailable",
        f"the broker cannot reach its {store}; retry shortly",
        {"Retry-After": "1"},
    )


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(
        500, "internal_error", "the broker failed to answer this request; it has been logged"
    )


EXCEPTION_HANDLERS = {
    ApiError: handle_api_error,
    HTTPException: handle_http_exception,
    GenerationNotFound: handle_not_found,
    StoreUnavailable: handle_store_unavailable,
    Exception: handle_unexpected,
}
