"""The access log: one line per HTTP request, written when its response is over.

``AccessLog`` is a pure ASGI middleware (logger ``streambroker.access``). An event stream is
one long request, so its line comes when it ends, with its duration, the events it sent and
whether the last was the stream's terminal event. Routes add what only they know with
``note()``: the caller's tenant (``api.auth``), a new stream's id, what an event stream sent.

``client`` is the connection's peer, or, for a request from a trusted proxy (``streambroker
api --forwarded-allow-ips``), the client its ``X-Forwarded-For`` names: uvicorn's proxy
headers middleware, in front of the app, has put that address in the scope already.

Secrets never reach the line: it has the path, but of the query string only the names of the
parameters (``token`` shows that a read token was used, never the token), and no header at
all (``Authorization`` holds the API key).
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.state import is_stream_id

logger = logging.getLogger("streambroker.access")

#: Where a request's scope holds the fields its routes noted.
_FIELDS = "streambroker.access_log"

#: Query parameters the API reads; any other name is shown as ``?`` (a client could put
#: anything in a name, a secret included). ``metadata.<key>`` filters show as ``metadata.*``.
KNOWN_PARAMETERS = frozenset(
    {
        "token",
        "last_event_id",
        "replay",
        "limit",
        "cursor",
        "status",
        "model",
        "created_after",
        "created_before",
    }
)

#: Longest path written; the rest is cut (a path can be as long as the request head allows).
MAX_PATH = 256

#: Paths that probes and scrapers ask for every few seconds: their successes are logged at
#: debug level, so they do not drown the requests of clients.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


#: The ``note()`` field of body bytes a route wrote around the ASGI ``send`` (the reader
#: hub's live writes, ``api.live_writes``): added to ``bytes_sent``, not a field of its own.
BYTES_WRITTEN_DIRECTLY = "bytes_written_directly"


def note(scope: Scope, **fields: Any) -> None:
    """Add ``fields`` to the access log line of the request of ``scope`` (nothing happens
    when no ``AccessLog`` is in front of the app)."""
    noted = scope.get(_FIELDS)
    if noted is not None:
        noted.update(fields)


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not logger.isEnabledFor(logging.WARNING):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        noted: dict[str, Any] = {}
        scope[_FIELDS] = noted
        status = 0
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, counting_send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            duration_ms = round((time.perf_counter() - started) * 1000, 1)
            if error is not None and status == 0:
                status = 500  # what Starlette's outermost handler answers
            _write(scope, noted, status, sent, duration_ms, error)


def _write(
    scope: Scope,
    noted: dict[str, Any],
    status: int,
    sent: int,
    duration_ms: float,
    error: BaseException | None,
) -> None:
    method = scope["method"]
    path = scope["path"]
    if len(path) > MAX_PATH:
        path = path[:MAX_PATH] + "…"
    fields: dict[str, Any] = {"method": method, "path": path}
    query = query_names(scope.get("query_string", b""))
    if query:
        fields["query"] = query
    sent += noted.pop(BYTES_WRITTEN_DIRECTLY, 0)
    fields |= {"status": status, "duration_ms": duration_ms, "bytes_sent": sent}
    client = scope.get("client")
    if client:
        # Behind a trusted proxy, uvicorn's proxy headers middleware put the address of
        # X-Forwarded-For here, usually without a port (0).
        fields["client"] = f"{client[0]}:{client[1]}" if client[1] else str(client[0])
    stream_id = scope.get("path_params", {}).get("stream_id")
    if isinstance(stream_id, str) and is_stream_id(stream_id):
        fields["stream_id"] = stream_id
    fields.update((key, value) for key, value in noted.items() if value is not None)
    if error is not None:
        fields["error"] = type(error).__name__
    if status >= 500:
        level = logging.WARNING
    elif status < 400 and scope["path"] in PROBE_PATHS:
        level = logging.DEBUG
    else:
        level = logging.INFO
    logger.log(level, "%s %s %d", method, path, status, extra=fields)


def query_names(raw: bytes) -> list[str]:
    """The names of the query's parameters, in order, once each; never a value."""
    names: list[str] = []
    for name, _ in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
        if name.startswith("metadata."):
            shown = "metadata.*"
        else:
            shown = name if name in KNOWN_PARAMETERS else "?"
        if shown not in names:
            names.append(shown)
    return names
