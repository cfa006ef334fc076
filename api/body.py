"""Reading a JSON request body with the limits every endpoint shares: type, size, syntax."""

from __future__ import annotations

from typing import Any

from starlette.requests import ClientDisconnect, Request

from api.errors import ApiError
from broker import strict_json
from broker.numbers import InvalidNumber, parse_int

#: Digits a Content-Length may have: 19 is past any body a client could send.
_LENGTH_DIGITS = 19


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_json(request: Request, *, max_bytes: int) -> Any:
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"the body must be JSON with Content-Type: application/json, not "
            f"{content_type or 'none'!r}",
        )
    declared = request.headers.get("content-length")
    if declared is not None and _declared_length(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:  # a chunked body has no Content-Length to check up front
                raise _too_large(max_bytes)
    except ClientDisconnect as exc:
        raise ApiError(400, "client_disconnected", "the client went away mid-body") from exc
    if not body.strip():
        raise ApiError(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        return strict_json.loads(body)
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from exc
    except ValueError as exc:
        message = str(exc)
        if message.startswith("it "):
            message = "the request body " + message[3:]
        else:
            message = f"the request body is not valid JSON: {message}"
        raise ApiError(400, "invalid_json", message) from exc


def _declared_length(header: str) -> int:
    """ASCII digits only (``broker.numbers``); the spaces and tabs HTTP allows around a field
    value are not part of it. An HTTP server refuses a malformed length before the app
    sees it; this is for those (and test clients) that pass it on."""
    try:
        return parse_int(header.strip(" \t"), max_digits=_LENGTH_DIGITS)
    except InvalidNumber:
        raise ApiError(
            400, "invalid_request", "Content-Length: expected the body's size in bytes (digits 0-9)"
        ) from None


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the request body is larger than {max_bytes} bytes")
