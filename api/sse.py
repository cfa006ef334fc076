"""Server-Sent Events: the wire encoding of events, and the response that streams them.

``EventStreamResponse`` is a plain ASGI response rather than Starlette's
``StreamingResponse`` because it must notice a client that hangs up even while no event is
being written (ASGI servers that advertise spec 2.4 only report a disconnect when a write
fails). It runs the body and a ``http.disconnect`` listener together; whichever ends first
cancels the other, so no work continues for a client that is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from broker.events import Event

logger = logging.getLogger("streambroker.api")

#: What an SSE response body is made of: chunks of whole event blocks, or a ``PING`` line.
#: Generators, so that a wrapper can close the one it wraps when its client goes.
Frames = AsyncGenerator[bytes, None]

#: The heartbeat: a comment *line*, with no blank line after it, so it never forms an event
#: of its own. Decoders that hand every block to their user, empty ones included (httpx-sse,
#: the openai SDK's), see only real events; the next event's lines simply follow it.
PING = b": ping\n"
#: The heartbeat as an event (``?heartbeat=event``), for browsers: EventSource hides
#: comments from scripts, so only an event lets one tell a quiet stream from a dead link.
#: No ``id:``, so the client's resume point does not move.
HEARTBEAT_EVENT = b"event: heartbeat\ndata: {}\n\n"

HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache, no-store",
    # nginx (and proxies that follow its convention) would otherwise buffer the stream.
    "x-accel-buffering": "no",
}


def encode_event(event: Event) -> bytes:
    """``event``, a one-line JSON ``data`` (``t``, ms since creation, rides along), then ``id``.

    The ``id:`` line comes last: some clients record the id as soon as they read its line,
    and a connection cut inside the event would then resume past an event never received."""
    data = dict(event.data)
    data["t"] = event.t
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event.type.value}\ndata: {payload}\nid: {event.seq}\n\n".encode()


def sse_frame(payload: str, event_id: str | None = None) -> bytes:
    """One unnamed event: its ``data`` line, then its ``id:`` line if it has one."""
    if event_id is None:
        return f"data: {payload}\n\n".encode()
    return f"data: {payload}\nid: {event_id}\n\n".encode()


class EventStreamResponse(Response):
    """An event stream: a ``: ping`` at once, then ``frames``, with ``retry: <ms>`` as the
    first line of the first event block.

    The opening ping tells the client (and any proxy between) that the stream is open
    before the first event, which may be a queue away. ``retry:`` is never a block of its
    own: a block with no ``data`` is an empty event to decoders that surface those.
    Heartbeats before the first event go out as they are (lines, not blocks), so the
    ``retry:`` line waits for the first real event. Both are done here, in the write loop,
    rather than by one more generator around ``frames``: that would cost every chunk of
    every client a hop."""

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        headers: dict[str, str] | None = None,
        *,
        retry_ms: int | None = None,
        send_timeout: float | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        ending: Callable[[], bool] | None = None,
    ) -> None:
        self.frames = frames
        #: Prefixed to the first chunk that is not a ping.
        self.retry_line = f"retry: {retry_ms}\n".encode() if retry_ms is not None else b""
        #: Run once the response is over, however it ended (a connection slot is given back).
        self.on_close = on_close
        #: True once the chunk about to be written holds the stream's end. ``on_close`` then
        #: runs before that write: a client that opens its next connection the moment it
        #: reads the end finds its connection slot given back already.
        self.ending = ending
        #: A client whose socket accepts nothing for this long is cut off (it can resume
        #: later); without it, a frozen client would hold its task and buffers forever.
        self.send_timeout = send_timeout
        self.status_code = 200
        self.background = None
        self.init_headers({**HEADERS, **(headers or {})})
        #: When the write in progress began (loop time), for the send watchdog.
        self.writing_since: float | None = None
        self.cut_off = False
        self._scope: anyio.CancelScope | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        loop = asyncio.get_running_loop()
        try:
            async with anyio.create_task_group() as group:
                self._scope = group.cancel_scope

                async def stream_body() -> None:
                    await send({"type": "http.response.body", "body": PING, "more_body": True})
                    retry_line = self.retry_line
                    async for chunk in self.frames:
                        if retry_line and chunk != PING:
                            chunk, retry_line = retry_line + chunk, b""
                        if self.ending is not None and self.ending():
                            self.ending = None
                            await self._closed()
                        self.writing_since = loop.time()
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        self.writing_since = None
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    group.cancel_scope.cancel()

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                if self.send_timeout is not None:
                    _watchdog(loop).watch(self)
                group.start_soon(stream_body)
                group.start_soon(watch_disconnect)
        finally:
            # Runs the generator's own cleanup now, not whenever it is garbage collected.
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()
            await self._closed()
        if self.cut_off:
            logger.info("a client accepted nothing for %ss; disconnected it", self.send_timeout)

    async def _closed(self) -> None:
        """``on_close``, once."""
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            await on_close()

    def cut_off_if_stuck(self, now: float) -> bool:
        """Called by the watchdog; True once this response is finished with."""
        if self._scope is None or self._scope.cancel_called:
            return self._scope is not None
        started = self.writing_since
        if (
            started is not None
            and self.send_timeout is not None
            and now - started > self.send_timeout
        ):
            self.cut_off = True
            self._scope.cancel()
            return True
        return False


class _SendWatchdog:
    """One task per event loop that cuts off responses whose current write is stuck.

    A timeout around every write would arm and cancel a timer per event per client, which
    under fan-out costs more of the api's CPU than the writes themselves; one periodic scan
    of the writes in progress costs next to nothing and gives the same bound (to within
    the scan interval).
    """

    def __init__(self) -> None:
        self._responses: weakref.WeakSet[EventStreamResponse] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None

    def watch(self, response: EventStreamResponse) -> None:
        self._responses.add(response)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._scan(), name="send-watchdog")

    async def _scan(self) -> None:
        loop = asyncio.get_running_loop()
        while self._responses:
            timeouts = [r.send_timeout for r in self._responses if r.send_timeout is not None]
            await asyncio.sleep(min(1.0, max(0.05, min(timeouts, default=1.0) / 4)))
            now = loop.time()
            for response in list(self._responses):
                if response.cut_off_if_stuck(now):
                    self._responses.discard(response)


_WATCHDOGS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _SendWatchdog] = (
    weakref.WeakKeyDictionary()
)


def _watchdog(loop: asyncio.AbstractEventLoop) -> _SendWatchdog:
    if loop not in _WATCHDOGS:
        _WATCHDOGS[loop] = _SendWatchdog()
    return _WATCHDOGS[loop]


async def pings_as_events(frames: Frames) -> Frames:
    """The same frames, each ``: ping`` replaced by a ``heartbeat`` event."""
    async with aclosing(frames):
        async for chunk in frames:
            yield HEARTBEAT_EVENT if chunk == PING else chunk
