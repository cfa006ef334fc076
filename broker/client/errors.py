"""What the client raises. A terminal ``error`` event is not among them: it is the stream's
last event (``StreamFailed``), yielded like ``Done``."""

from __future__ import annotations

import json

import httpx


class ClientError(Exception):
    """Anything the client could not do."""


class APIError(ClientError):
    """The broker answered with an error (``{"error": {"code", "message"}}``)."""

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
            text = one_line(response.text)
            if text:
                message = text
        return cls(response.status_code, code, message)


class ConnectionFailed(ClientError):
    """The broker could not be reached, did not answer in time, cut an answer short (an
    export), or kept failing for longer than the client waits."""


def one_line(text: str, limit: int = 200) -> str:
    """``text`` (an HTML error page, say) as one line of at most ``limit`` characters, so
    that a message quoting it stays one line."""
    return " ".join(text.split())[:limit]
