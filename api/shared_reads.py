"""Catch-up reads shared by the clients of one process that ask for the same page at once.

When a front-end goes away, its clients come back to the others all at once, and most of
them resume the same few streams from the same few ids. Each used to read its page of the
log on its own (one pooled Redis connection, ~20 KB of reply to parse, every event decoded
and encoded to SSE again): 5,000 such clients queued for the process's handful of pooled
connections long enough to be answered 503, and the loop's time went to re-encoding the
same events, so every live reader of the process waited.

``SharedReads.page`` makes one read per distinct (stream, after, count) in flight, and every
client asking for it meanwhile gets the same events and the same encoded bytes. Nothing is
kept once the read is answered: a page is only ever shared by requests that overlap in time,
so it is exactly what each of them would have read on its own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from api.sse import encode_event
from broker.events import Event
from broker.generation_log import GenerationLog


@dataclass(frozen=True)
class Page:
    """What one read of the log returned, and its SSE bytes."""

    events: list[Event]
    #: The SSE bytes of ``events`` up to and including a terminal one (nothing follows it).
    data: bytes
    #: The events ``data`` holds, and the id of the last of them.
    sent: int
    last_seq: int
    #: ``data`` ends with the stream's terminal event.
    ended: bool

    @classmethod
    def of(cls, events: list[Event]) -> Page:
        chunk = bytearray()
        sent, last_seq, ended = 0, 0, False
        for event in events:
            chunk += encode_event(event)
            sent, last_seq = sent + 1, event.seq
            if event.terminal:
                ended = True
                break
        return cls(events, bytes(chunk), sent, last_seq, ended)


class SharedReads:
    def __init__(self, log: GenerationLog) -> None:
        self.log = log
        #: The read in flight for each page, and the number it was started under.
        self._reads: dict[tuple[str, int, int], tuple[int, asyncio.Task[Page]]] = {}
        self._started = 0

    def mark(self) -> int:
        """A point in time for ``page(after_mark=)``: reads started from now on are past it."""
        return self._started

    async def page(
        self, stream_id: str, after_seq: int, count: int, *, after_mark: int | None = None
    ) -> Page:
        """The events of ``stream_id`` after ``after_seq`` (at most ``count``), read once for
        every caller that asks the same while it is in flight.

        ``after_mark``: join only a read started after that ``mark()``. The hub's hand-over
        needs a read that reaches Redis after the client registered (``api.watch``); one
        issued earlier by another client may miss events the hub has read already.
        """
        key = (stream_id, after_seq, count)
        pending = self._reads.get(key)
        if pending is None or (after_mark is not None and pending[0] <= after_mark):
            self._started += 1
            # A task of its own, not the first caller's: that client hanging up must not
            # cancel the read for the others.
            read = asyncio.get_running_loop().create_task(self._read(key))
            pending = self._reads[key] = (self._started, read)
            read.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(pending[1])

    async def _read(self, key: tuple[str, int, int]) -> Page:
        stream_id, after_seq, count = key
        return Page.of(await self.log.read(stream_id, after_seq, count=count))

    def _forget(self, key: tuple[str, int, int], read: asyncio.Task[Page]) -> None:
        pending = self._reads.get(key)
        if pending is not None and pending[1] is read:
            del self._reads[key]
        if not read.cancelled():
            read.exception()  # every caller may have left: never "exception not retrieved"
