"""What the client raises. A terminal ``error`` event is not among them: it is the stream's
last event (``StreamFailed``), yielded like ``Done``."""

from __future__ import annotations

import json

import httpx


class ClientError(Exception):
    """Anything the client could not do."""


class APIError(ClientError):
    """The broker answered with an error (API.md's ``{"error": {"code", "message"}}``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def from_response(cls, response: httpx.Response) -> APIError:
        code, message = f"http_{response.status_code}", response.reason_phrase
        try:
            error = json.loads(response.content)["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            text = response.text.strip()
            if text:
                message = text[:200]
        return cls(response.status_code, code, message)


class ConnectionFailed(ClientError):
    """The broker could not be reached (or kept failing for longer than the client waits)."""
