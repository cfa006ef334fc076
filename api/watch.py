"""What one watching client receives: recorded events from its resume point, then live ones.

A client moves through three phases, and its *cursor* (the id of the last event it was sent)
decides every step, so nothing is missed or repeated at the joins:

1. **Catch up** from the log at its own pace, registered nowhere, until a read comes back
   short (it is near the tail).
2. **Hand over**: register with the process's reader hub, *then*, if the hub had already
   offered events past the cursor (``Subscription.behind``), read the log once more.
   Anything appended before the registration is in that read; anything after it is offered
   by the hub. The two may overlap; they cannot leave a hole. When the hub was not past the
   cursor (the common case: a stream new to this process, or clients at the live tail),
   every event past the cursor is still to be offered, and the read is skipped.
3. **Live**: take frames from the subscription's buffer. A frame at or below the cursor is
   a duplicate of the overlap and is skipped; a frame beyond ``cursor + 1`` means events are
   missing from the buffer, and they are read from the log first.

A client that starts at the log's end (``tail_seq``, from the caller's own state read) also
skips the catch-up read: a viewer joining a live stream costs no Redis call beyond that state
read. Under a connection storm that matters: each call holds one of the process's few pooled
connections while the loop is busy.

A client whose buffer overflowed (it reads slower than events come) goes back to phase 1;
that catch-up merges consecutive ``token`` events into one (same text, the last id), so a
slow reader needs fewer writes. A heartbeat is the hub's tick waking a client that has
nothing to send (``: ping``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from api.hub import ReaderHub, Subscription
from api.live_writes import DirectWrites, LiveWriter
from api.shared_reads import SharedReads
from api.sse import PING, Frames, encode_event
from broker import metrics
from broker.errors import StoreUnavailable
from broker.events import Event, EventType
from broker.generation_log import GenerationLog

logger = logging.getLogger("streambroker.api")

#: Events one catch-up read takes; a shorter answer means the reader is near the tail.
CATCH_UP_COUNT = 256


@dataclass
class Delivery:
    """What one response sent, for its access log line (shared by every ``Reader`` it uses)."""

    #: Events sent (merged tokens count once).
    events: int = 0
    #: The id of the last event sent: where the client resumes from.
    last_id: int = 0
    #: The stream's terminal event was sent.
    ended: bool = False
    #: Body bytes the hub's live writes sent (the access log counts the rest itself).
    live_bytes: int = 0


async def watch_frames(
    log: GenerationLog,
    hub: ReaderHub,
    stream_id: str,
    after_seq: int,
    *,
    tail_seq: int | None = None,
    delivery: Delivery | None = None,
    direct: DirectWrites | None = None,
    reads: SharedReads | None = None,
) -> Frames:
    """SSE bytes for one client; ends after the terminal event.

    It also ends without one when the generation disappears (the reconnect gets 404), when
    Redis becomes unreachable, or when the process shuts down; the client then reconnects
    after ``retry`` and resumes from the last id it received, on any front-end.

    ``tail_seq``: the log's last id as the caller just read it, if it did. ``delivery``:
    counts what was sent. ``direct``: lets the hub write live events straight to the
    connection while this client waits at the tail (``api.live_writes``); what it writes
    is never yielded. ``reads``: catch-up pages shared with the process's other clients
    reading the same at once (``api.shared_reads``). Every chunk is whole event blocks, or
    ``PING`` alone.
    """
    reader = Reader(log, stream_id, after_seq, delivery, reads)
    live = LiveWriter(direct, reader) if direct is not None else None
    try:
        while True:
            if tail_seq is None or reader.cursor < tail_seq:
                async for chunk in reader.catch_up():
                    yield chunk
                if reader.ended:
                    return
            tail_seq = None  # only known for the first pass
            subscription = hub.subscribe(stream_id, reader.cursor)
            registered = reads.mark() if reads is not None else None
            try:
                if subscription.behind:
                    # The hand-over read: it must reach Redis after the registration.
                    async for chunk in reader.catch_up(after_mark=registered):
                        yield chunk
                    if reader.ended:
                        return
                async for chunk in reader.follow(subscription, live):
                    yield chunk
                if reader.ended or subscription.closed:
                    return
                reader.coalesce = True  # it overflowed: catch up with merged tokens
            finally:
                hub.unsubscribe(subscription)
    except StoreUnavailable:
        logger.warning(
            "stream %s: Redis unreachable; ending the response so the client resumes later",
            stream_id,
        )


class Reader:
    """One client's cursor and the two ways it advances: from the log, and from the hub."""

    def __init__(
        self,
        log: GenerationLog,
        stream_id: str,
        cursor: int,
        delivery: Delivery | None = None,
        reads: SharedReads | None = None,
    ) -> None:
        self.log = log
        #: Catch-up pages shared with the process's other clients (``api.shared_reads``).
        self.reads = reads
        self.stream_id = stream_id
        self.cursor = cursor
        self.ended = False
        self.coalesce = False
        self.delivery = delivery or Delivery()

    async def catch_up(self, *, after_mark: int | None = None) -> AsyncIterator[bytes]:
        """Everything the log has past the cursor, in chunks, until a read comes back short.
        ``after_mark``: only reads started after that ``SharedReads.mark()``."""
        while not self.ended:
            if self.reads is not None and not self.coalesce:
                page = await self.reads.page(
                    self.stream_id, self.cursor, CATCH_UP_COUNT, after_mark=after_mark
                )
                if page.sent:
                    metrics.EVENTS_SENT.inc(page.sent)
                    self.cursor, self.ended = page.last_seq, page.ended
                    self._delivered(page.sent)
                    yield page.data
                if len(page.events) < CATCH_UP_COUNT:
                    return
                continue
            events = await self.log.read(self.stream_id, self.cursor, count=CATCH_UP_COUNT)
            if events:
                shown = coalesce_tokens(events) if self.coalesce else events
                yield self.render(shown)
            if len(events) < CATCH_UP_COUNT:
                return

    async def follow(
        self, subscription: Subscription, live: LiveWriter | None = None
    ) -> AsyncIterator[bytes]:
        """Live frames until the terminal event, an overflow, or the subscription closes;
        ``live`` writes them itself while this waits for them."""
        while not self.ended:
            frames = await subscription.take(live)
            if self.ended:
                return  # the live writer wrote the end
            chunk = bytearray()
            sent = 0
            for frame in frames:
                if frame.seq <= self.cursor:
                    continue
                if frame.seq > self.cursor + 1:
                    wanted = frame.seq - self.cursor - 1
                    missing = await self.log.read(self.stream_id, self.cursor, count=wanted)
                    if len(missing) < wanted:
                        # The log read here lacks events the hub saw: the two connections
                        # reached different nodes for a moment (a failover). Sending the
                        # frame would skip events; end the response, the client resumes.
                        raise StoreUnavailable("the log lacks events the reader hub saw")
                    chunk += self.render(missing)
                chunk += frame.data
                sent += 1
                self.cursor = frame.seq
                self.ended = frame.terminal
                if self.ended:
                    break
            if chunk:
                metrics.EVENTS_SENT.inc(sent)
                self._delivered(sent)
                yield bytes(chunk)
            if subscription.overflowed or subscription.closed:
                return
            if not frames:
                yield PING

    def render(self, events: list[Event]) -> bytes:
        """SSE bytes of events read from the log (counted as sent: they are, next)."""
        chunk = bytearray()
        metrics.EVENTS_SENT.inc(len(events))
        for event in events:
            chunk += encode_event(event)
            self.cursor = event.seq
            if event.terminal:
                self.ended = True
                break
        self._delivered(len(events))
        return bytes(chunk)

    def advance(self, seq: int, count: int, *, ended: bool, size: int) -> None:
        """``count`` events up to ``seq`` (``size`` bytes) were written for this client by
        its live writer."""
        self.cursor = seq
        self.ended = ended
        self.delivery.live_bytes += size
        self._delivered(count)

    def _delivered(self, count: int) -> None:
        self.delivery.events += count
        self.delivery.last_id = self.cursor
        self.delivery.ended = self.ended


def coalesce_tokens(events: list[Event]) -> list[Event]:
    """Merge each run of consecutive ``token`` events into one carrying the run's last id.

    The text is the same and ids still increase; a reader that fell behind needs fewer
    writes to catch up. Other events keep their place between the runs.
    """
    merged: list[Event] = []
    for event in events:
        previous = merged[-1] if merged else None
        if event.type is EventType.TOKEN and previous and previous.type is EventType.TOKEN:
            data = {
                "text": previous.data["text"] + event.data["text"],
                "tokens": previous.data["tokens"] + event.data["tokens"],
            }
            merged[-1] = Event(EventType.TOKEN, data, t=event.t, seq=event.seq)
        else:
            merged.append(event)
    return merged
