"""The subscriber's side of the reader hub (``api.hub``): the frames it offers, each
client's bounded buffer of them, and the waker that hands the buffers to their clients.

While the client's task waits at the live tail, the hub writes new events straight to its
connection (``Subscription.offer_batch`` with a ``LiveWriter`` armed, ``api.live_writes``),
and nothing below happens. Otherwise, and whenever the writer leaves a batch to the task:

The hub never waits for a subscriber: ``Subscription.offer`` appends to a bounded buffer or,
when the buffer is full, marks the subscription *overflowed* and drops it from live delivery.
The client's own task (``api.watch``) then catches up from the log at its own pace and joins
again. Which events a client receives is decided there, by its cursor; the hub only promises
that every event appended after a subscriber registered is offered to it, in order, unless
it overflowed.

Subscribers are woken a slice at a time (``Waker``), not all at once. asyncio runs every
callback that is ready at the start of a loop iteration before it looks at sockets again,
so waking thousands of clients in one go makes one iteration as long as thousands of
socket writes, and every request handler, Redis reply and cancel waits
that long per ``await``. In slices, an iteration holds a bounded number of writes and
everything else on the loop keeps moving while a large fan-out is written. A client that
is already waiting to be woken is not queued twice: its frames pile up in its buffer and
go out in one write.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from api.live_writes import chunked
from broker import metrics

if TYPE_CHECKING:
    from api.live_writes import LiveWriter

#: gone: the stream expired or was deleted; lost: its log is shorter than what the hub
#: already read (Redis lost events); shutdown: the process is stopping; failed: delivering to
#: this client raised (its connection broke under the hub's write).
CloseReason = Literal["gone", "lost", "shutdown", "failed"]

#: Subscribers woken per loop iteration. Each woken client writes to its socket, so this
#: bounds how long one iteration spends on writes.
WAKE_SLICE = 64


@dataclass(frozen=True, slots=True)
class Frame:
    """One event as every subscriber receives it: encoded once, shared."""

    seq: int
    data: bytes
    terminal: bool


class Batch:
    """The new events of one stream that the hub read in one go, as every subscriber gets
    them, and as one HTTP chunk for the connections it writes to directly
    (``api.live_writes``). Under load each read brings more events, so each of those writes
    carries more of them: the fan-out coalesces by itself instead of falling behind."""

    __slots__ = ("chunk", "contiguous", "data", "first_seq", "frames", "last_seq", "terminal")

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames
        self.first_seq = frames[0].seq
        self.last_seq = frames[-1].seq
        self.terminal = frames[-1].terminal
        self.contiguous = self.last_seq - self.first_seq == len(frames) - 1
        self.data = b"".join(frame.data for frame in frames)
        self.chunk = chunked(self.data)

    def data_after(self, cursor: int) -> bytes:
        """The bytes of the frames past ``cursor`` (a client that had some already)."""
        if cursor < self.first_seq:
            return self.data
        return b"".join(frame.data for frame in self.frames if frame.seq > cursor)


class Subscription:
    """One client's place in live delivery: a bounded buffer the hub fills without waiting."""

    def __init__(self, stream_id: str, limit: int, waker: Waker) -> None:
        self.stream_id = stream_id
        self._limit = limit
        self._waker = waker
        # A list, not a deque: an empty deque costs ~600 bytes, per connection.
        self._frames: list[Frame] = []
        #: The client's task, parked in ``take`` until there is something for it.
        self._waiter: asyncio.Future[None] | None = None
        #: In the waker's queue already; more frames just join the buffer.
        self.wake_queued = False
        #: When it joined the waker's queue (monotonic clock), for the hub lag metric.
        self.queued_at = 0.0
        #: The heartbeat tick came: ``take`` returns even with nothing buffered.
        self._ping_due = False
        #: Set when the buffer was full: the client must catch up from the log and rejoin.
        self.overflowed = False
        #: Why live delivery ended for good: the stream is gone, or the process shuts down.
        self.closed: CloseReason | None = None
        #: The hub had already offered events past the subscriber's cursor when it joined:
        #: those must be read from the log (the hand-over read). Otherwise every event past
        #: the cursor is still to be offered, and no read is needed.
        self.behind = False
        #: Set while the client's task sleeps in ``take`` at the live tail: new events are
        #: written straight to its connection (``api.live_writes``) instead of buffered.
        self.live: LiveWriter | None = None
        #: The live writer wrote the stream's end: the task wakes to finish the response.
        self._live_ended = False

    def offer_batch(self, batch: Batch) -> int:
        """Called by the hub with a stream's new events; never blocks. Returns how many it
        wrote straight to the client's connection (0: buffered for its task, or none new)."""
        if self.overflowed or self.closed:
            return 0
        live = self.live
        if live is not None:
            written = live.write(batch)
            if written is not None:
                if written and batch.terminal:
                    self.live = None
                    self._live_ended = True
                    self._waker.schedule(self)  # teardown waits its turn, after the writes
                return written
            self.live = None  # the task takes it from here, in order
        for frame in batch.frames:
            self.offer(frame)
        return 0

    def offer(self, frame: Frame) -> None:
        """Called by the hub; never blocks. A full buffer ends this subscription's live life."""
        if self.overflowed or self.closed:
            return
        if len(self._frames) >= self._limit:
            self.overflowed = True
            self._frames.clear()  # the client re-reads these from the log anyway
        else:
            self._frames.append(frame)
        self._waker.schedule(self)

    def close(self, reason: CloseReason) -> None:
        """End live delivery now; not through the waker, which may be stopping too."""
        self.closed = reason
        self._resolve()

    def poke(self) -> None:
        """The hub's heartbeat tick: wake the client so it writes a ping if it has nothing
        (a live writer writes it without waking anyone)."""
        live = self.live
        if live is not None and live.ping():
            return
        self._ping_due = True
        self._waker.schedule(self)

    def wake(self) -> None:
        """Called by the waker: let the client's task run ``take`` to its end."""
        self.wake_queued = False
        self._resolve()

    def _resolve(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, live: LiveWriter | None = None) -> list[Frame]:
        """Every buffered frame, waiting for one; [] when woken by the heartbeat tick, or
        once ``live`` wrote the stream's end.

        ``live``: armed while waiting, so that the hub writes new events itself; the task
        wakes only for what the writer leaves to it.

        No timer per wait: a timeout here would be armed and cancelled once per event per
        client, which under fan-out costs more of the api's CPU than the writes themselves. The
        hub's single tick (``poke``) replaces them all.
        """
        while not (
            self._frames or self._ping_due or self.overflowed or self.closed or self._live_ended
        ):
            if live is not None and live.ready:
                self.live = live
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
                self.live = None
        self._ping_due = False
        frames, self._frames = self._frames, []
        return frames


class Waker:
    """Wakes subscribers in slices of ``WAKE_SLICE``, one slice per loop iteration.

    Why not all at once: see the module's docstring. The queue is first in, first out, so
    every client waits at most one pass over the clients ahead of it.
    """

    def __init__(self, slice_size: int = WAKE_SLICE) -> None:
        self._slice = slice_size
        self._queue: deque[Subscription] = deque()
        self._pending: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def schedule(self, subscription: Subscription) -> None:
        if subscription.wake_queued:
            return
        subscription.wake_queued = True
        subscription.queued_at = time.monotonic()
        self._queue.append(subscription)
        pending = self._pending
        if pending is not None and not pending.done():
            pending.set_result(None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            if not queue:
                self._pending = loop.create_future()
                try:
                    await self._pending
                finally:
                    self._pending = None
            # Lag, once per slice: how long its first subscriber waited to be woken.
            metrics.HUB_LAG.observe(time.monotonic() - queue[0].queued_at)
            for _ in range(min(self._slice, len(queue))):
                queue.popleft().wake()
            # The woken tasks run before this one resumes, and the loop polls its sockets
            # before the next slice.
            await asyncio.sleep(0)
