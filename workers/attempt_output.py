"""What one attempt of a generation writes: its events, stamped and appended in order.

Every event an attempt appends carries ``t``, the milliseconds since the generation was
created, and goes through the attempt's fenced ``LogWriter``, so a stale attempt cannot
write. ``AttemptOutput`` remembers the terminal event once it is in the log, because the
``finished`` line reports only an end this attempt wrote (a fenced attempt leaves that to
whoever ended the generation).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from broker import events
from broker.errors import SequenceConflict
from broker.events import Event, EventType
from broker.generation_log import LogWriter
from broker.state import now_ms

logger = logging.getLogger("streambroker.worker")


class AttemptOutput:
    """One attempt's events: built with their ``t`` and appended through its writer."""

    def __init__(self, writer: LogWriter, *, origin_ms: int) -> None:
        self.writer = writer
        #: When the generation was created (ms since the epoch): ``t`` counts from it.
        self.origin_ms = origin_ms
        #: The terminal event this attempt appended, once it is in the log.
        self.terminal: Event | None = None

    def t(self) -> int:
        """Milliseconds since the generation was created: the ``t`` of every event."""
        return now_ms() - self.origin_ms

    def event(self, kind: EventType, data: dict[str, Any]) -> Event:
        return Event(kind, data, t=self.t())

    def error(
        self, code: str, message: str, *, retryable: bool, retry_after: float | None = None
    ) -> Event:
        return events.error(code, message, retryable=retryable, t=self.t(), retry_after=retry_after)

    async def append(self, *batch: Event) -> None:
        """Append in order, atomically; raises what the fenced writer raises."""
        await self.writer.append(*batch)
        if batch and batch[-1].terminal:
            self.terminal = batch[-1]

    async def end_quietly(self, event: Event) -> None:
        """Best effort terminal event on the way out; the log refuses it if one exists.

        After a lost append reply the log may be ahead of this writer with its own events;
        the writer then resynchronises once, so the stream still gets its terminal event.
        """
        try:
            await self.writer.end(event)
        except SequenceConflict as conflict:
            self.writer.next_seq = conflict.actual_last + 1
            with contextlib.suppress(Exception):
                await self.writer.end(event)
                self.terminal = event
        except Exception as exc:
            logger.warning(
                "generation %s: could not append its end: %s",
                self.writer.stream_id,
                exc,
                extra={"stream_id": self.writer.stream_id},
            )
        else:
            self.terminal = event
