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

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.live_writes import SERVER_SEND, DirectWrites, TransportSink
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


_RAW_HEADERS = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in HEADERS.items()]


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
        direct: DirectWrites | None = None,
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
        #: Given the connection once the opening lines are out, for the hub's live writes
        #: (``api.live_writes``); ``frames`` holds the same object.
        self.direct = direct
        self.status_code = 200
        self.background = None
        extra = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()
        ]
        replaced = {name for name, _ in extra}
        # The shared headers' bytes are made once for every connection (``_RAW_HEADERS``).
        self.raw_headers = [h for h in _RAW_HEADERS if h[0] not in replaced] + extra
        #: When the write in progress began (loop time), for the send watchdog.
        self.writing_since: float | None = None
        self.cut_off = False
        #: The task writing this response, while it runs.
        self._task: asyncio.Task[object] | None = None
        #: The client hung up or was cut off: this response cancelled its own task.
        self._ended_here = False
        #: The body is over (written, or given up): nothing may cancel the task any more.
        self._done = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        loop = asyncio.get_running_loop()
        task = self._task = asyncio.current_task()
        assert task is not None
        # The body is written by this task itself, and one small task listens for the hang-up
        # (plain asyncio: a task group's objects would cost every connection about a KB).
        listener = loop.create_task(self._end_on_disconnect(receive))
        watchdog = _watchdog(loop) if self.send_timeout is not None else None
        if watchdog is not None:
            watchdog.watch(self)
        try:
            await self._stream_body(scope, send, loop)
        except asyncio.CancelledError:
            # Ours (the client is gone, or cut off) can only have landed in the body, as
            # nothing else here awaits while it may come: over and done with. Anyone else's
            # (the server stopping), alone or on top of ours, goes through.
            if not self._ended_here or task.uncancel() > 0:
                raise
        finally:
            self._done = True
            self._task = None
            listener.cancel()
            if watchdog is not None:
                watchdog.forget(self)
            # Runs the generator's own cleanup now, not whenever it is garbage collected.
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()
            await self._closed()
        if self.cut_off:
            # Closing would wait for the unsent bytes to go out, which they never do: the
            # connection and its buffers would stay. Reset it instead (when it is reachable).
            sink = TransportSink.of(scope.get(SERVER_SEND))
            if sink is not None:
                sink.abort()
                # Let the server see the connection lost (scheduled by the abort) before this
                # returns: else it reports a response that ended without completing.
                await asyncio.sleep(0)
            logger.info("a client accepted nothing for %ss; disconnected it", self.send_timeout)

    async def _end_on_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._end_here()

    def _end_here(self) -> None:
        """Stop writing the body now (the client is gone, or takes nothing)."""
        if not self._done and not self._ended_here and self._task is not None:
            self._ended_here = True
            self._task.cancel()

    async def _stream_body(self, scope: Scope, send: Send, loop: asyncio.AbstractEventLoop) -> None:
        await send({"type": "http.response.body", "body": PING, "more_body": True})
        retry_line = self.retry_line
        direct = self.direct
        if direct is not None:
            # From now on the first event may be written by the hub: it takes the retry line
            # from there, or this loop does.
            direct.lead, retry_line = retry_line, b""
            direct.sink = TransportSink.of(scope.get(SERVER_SEND))
        async for chunk in self.frames:
            if chunk != PING:
                if retry_line:
                    chunk, retry_line = retry_line + chunk, b""
                elif direct is not None and direct.lead:
                    chunk = direct.take_lead() + chunk
            if self.ending is not None and self.ending():
                self.ending = None
                await self._closed()
            self.writing_since = loop.time()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.writing_since = None
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _closed(self) -> None:
        """``on_close``, once."""
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            await on_close()

    def cut_off_if_stuck(self, now: float) -> bool:
        """Called by the watchdog; True once this response is finished with."""
        if self._done or self._ended_here:
            return True
        started = self.writing_since
        if (
            started is not None
            and self.send_timeout is not None
            and now - started > self.send_timeout
        ):
            self.cut_off = True
            self._end_here()
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
        # A plain set (a weak one costs a weakref per connection): responses leave it when
        # they end (``forget``), or when the scan finds them finished.
        self._responses: set[EventStreamResponse] = set()
        self._task: asyncio.Task[None] | None = None

    def watch(self, response: EventStreamResponse) -> None:
        self._responses.add(response)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._scan(), name="send-watchdog")

    def forget(self, response: EventStreamResponse) -> None:
        self._responses.discard(response)

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
