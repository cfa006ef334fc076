"""Reading a JSON request body with the limits every endpoint shares: type, size, syntax."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import ClientDisconnect, Request

from api.errors import ApiError


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
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
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
        value = json.loads(
            body, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_int64
        )
    except RecursionError as exc:
        raise ApiError(400, "invalid_json", "the request body nests too deeply") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from exc
    try:
        # Lone surrogates (\ud800) parse, but cannot be stored as UTF-8 or sent back.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(
            400,
            "invalid_json",
            "the request body contains a lone UTF-16 "
            "surrogate (an escape such as \\ud800 without its pair)",
        ) from exc
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is too large for a number")
    return value


def _int64(text: str) -> int:
    """Integers the broker can store and every client can read back: 64-bit signed."""
    value = int(text)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"the integer {text[:40]} is outside the 64-bit range")
    return value


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the request body is larger than {max_bytes} bytes")
