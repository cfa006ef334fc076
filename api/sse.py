"""Server-Sent Events: the wire encoding of events, and the response that streams them.

``EventStreamResponse`` is a plain ASGI response rather than Starlette's
``StreamingResponse`` because it must notice a client that hangs up even while no event is
being written (ASGI servers that advertise spec 2.4 only report a disconnect when a write
fails). It runs the body and a ``http.disconnect`` listener together; whichever ends first
cancels the other, so no work continues for a client that is gone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from broker.events import Event

logger = logging.getLogger("streambroker.api")

PING = b": ping\n\n"

HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache, no-store",
    # nginx (and proxies that follow its convention) would otherwise buffer the stream.
    "x-accel-buffering": "no",
}


def encode_event(event: Event) -> bytes:
    """``id``, ``event`` and a one-line JSON ``data``; ``t`` (ms since creation) rides along."""
    data = dict(event.data)
    data["t"] = event.t
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.seq}\nevent: {event.type.value}\ndata: {payload}\n\n".encode()


def retry_frame(retry_ms: int) -> bytes:
    return f"retry: {retry_ms}\n\n".encode()


class EventStreamResponse(Response):
    def __init__(
        self,
        frames: AsyncIterator[bytes],
        headers: dict[str, str] | None = None,
        *,
        send_timeout: float | None = None,
    ) -> None:
        self.frames = frames
        #: A client whose socket accepts nothing for this long is cut off (it can resume
        #: later); without it, a frozen client would hold its task and buffers forever.
        self.send_timeout = send_timeout
        self.status_code = 200
        self.background = None
        self.init_headers({**HEADERS, **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async with anyio.create_task_group() as group:

                async def stream_body() -> None:
                    try:
                        async for chunk in self.frames:
                            with anyio.fail_after(self.send_timeout):
                                await send(
                                    {"type": "http.response.body", "body": chunk, "more_body": True}
                                )
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    except TimeoutError:
                        logger.info(
                            "a client accepted nothing for %ss; disconnecting it", self.send_timeout
                        )
                    group.cancel_scope.cancel()

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream_body)
                group.start_soon(watch_disconnect)
        finally:
            # Runs the generator's own cleanup now, not whenever it is garbage collected.
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()
