"""``LogWriter``: one attempt's fenced appends to a generation, and how it rides out Redis.

A writer is what ``GenerationLog.writer`` hands the holder of a claim: it keeps the attempt
(the fencing token) and the next sequence number, so the caller only passes events. Every
append is one script call that checks both before it writes (``GenerationLog.append_batch``),
so a writer that lost its claim can never append again, and a retried append cannot
duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from broker import metrics
from broker.appends import final_status
from broker.errors import StoreUnavailable
from broker.events import Event, EventType

if TYPE_CHECKING:
    from broker.generation_log import GenerationLog

#: Back-off between retries of a writer's store call while Redis is unreachable: short at
#: first (a dropped connection is usually back at once), never long (a failover of a few
#: seconds should delay events by little more than itself).
_RETRY_FIRST_SECONDS = 0.05
_RETRY_MAX_SECONDS = 0.5

T = TypeVar("T")


class LogWriter:
    """One attempt's right to append to one generation, and its position in the log.

    Every store call a writer makes (appends, lease renewals and the cancel poll they carry,
    the lease index) rides out a Redis outage shorter than the lease: it is retried with
    bounded back-off until the lease this writer last secured would lapse, and only then
    raises ``StoreUnavailable``. Until then no sweeper can take the generation over, so
    waiting is safe; after it, giving up is right (a sweeper may already have).
    """

    def __init__(
        self, log: GenerationLog, stream_id: str, attempt: int, next_seq: int, lease_seconds: float
    ) -> None:
        self.log = log
        self.stream_id = stream_id
        self.attempt = attempt
        self.next_seq = next_seq
        self.lease_seconds = lease_seconds
        #: Set once an append reports that a client asked to cancel.
        self.cancel_requested = False
        #: Until when the lease index has this generation (ms, Redis's clock), as this writer
        #: last set it: the claim put it a lease ahead, a little before now.
        self._indexed_until_ms: int | None = None
        #: Until when (monotonic) the lease this writer last secured holds at the least.
        self._lease_holds_until = time.monotonic() + lease_seconds
        #: The first id of a batch that failed with its outcome unknown (its reply was lost):
        #: the store may have written it, and readers read it, on a master since replaced.
        #: Whatever this writer appends there next says so, so that the store can record the
        #: loss if its timeline changed (``broker.scripts.APPEND``).
        self._in_doubt_from: int | None = None

    async def append(self, *batch: Event) -> list[Event]:
        """Append events in order, atomically; returns them with their sequence numbers.

        Raises ``StaleWriter`` if another attempt took over, ``GenerationEnded`` after a
        terminal event, ``SequenceConflict`` if the log moved under this writer. While Redis
        is unreachable the same batch is retried until the lease would lapse (appends are
        idempotent, so a batch whose reply was lost is not written twice); then
        ``StoreUnavailable``.
        """
        if not batch:
            return []
        in_doubt = self._in_doubt_from == self.next_seq
        try:
            last, cancel = await self._ride_out(
                lambda: self.log.append_batch(
                    self.stream_id,
                    self.attempt,
                    self.next_seq,
                    batch,
                    self.lease_seconds,
                    in_doubt=in_doubt,
                ),
                extends_lease=True,
            )
        except StoreUnavailable:
            if self._in_doubt_from is None:
                self._in_doubt_from = self.next_seq
            raise
        self._in_doubt_from = None
        stored = [e.with_seq(self.next_seq + i) for i, e in enumerate(batch)]
        self.next_seq = last + 1
        self.cancel_requested = self.cancel_requested or cancel
        _count(batch)
        if batch[-1].terminal:
            # Ended: nothing left for a sweeper, and due for the archive if there is one (if
            # this is lost, a sweep finds it ended and does the same).
            with contextlib.suppress(StoreUnavailable):
                await self.log.ended(self.stream_id)
        return stored

    async def end(self, event: Event) -> list[Event]:
        """Append a terminal event on the way out, after this writer gave up on the store:
        it gets a lease's worth of retries of its own (if a sweeper took over meanwhile, the
        fence refuses it and the sweeper's end stands)."""
        self._lease_holds_until = max(
            self._lease_holds_until, time.monotonic() + self.lease_seconds
        )
        return await self.append(event)

    async def mark_lost(self, first_seq: int) -> None:
        """Record that the store lost this writer's events from ``first_seq`` on, riding out
        the store for a lease of its own like ``end``: the end that follows lands at
        ``first_seq``, and must not before the loss is recorded (``StoreUnavailable``)."""
        self._lease_holds_until = max(
            self._lease_holds_until, time.monotonic() + self.lease_seconds
        )
        await self._ride_out(lambda: self.log.mark_lost(self.stream_id, first_seq))

    async def renew(self) -> None:
        """Keep the lease while the provider is quiet, and learn of a cancel or a takeover.

        The lease index is moved along every half lease, not at every renewal: it is only
        where sweepers look, and they check the lease itself before they act.
        """
        cancel, lease_until = await self._ride_out(
            lambda: self.log.renew(self.stream_id, self.attempt, self.lease_seconds),
            extends_lease=True,
        )
        metrics.LEASE_RENEWALS.inc()
        if cancel:
            self.cancel_requested = True
        lease_ms = int(self.lease_seconds * 1000)
        if self._indexed_until_ms is None or lease_until - lease_ms // 2 >= self._indexed_until_ms:
            self._indexed_until_ms = lease_until
            await self._ride_out(lambda: self.log.index_lease(self.stream_id, lease_until))

    async def _ride_out(
        self, call: Callable[[], Awaitable[T]], *, extends_lease: bool = False
    ) -> T:
        """``call()``, retried while Redis is unreachable and this writer's lease holds.

        ``extends_lease``: the call renews the lease when it succeeds, from (at the earliest)
        the moment the successful try was sent."""
        delay = _RETRY_FIRST_SECONDS
        while True:
            sent = time.monotonic()
            try:
                result = await call()
            except StoreUnavailable:
                remaining = self._lease_holds_until - time.monotonic()
                if remaining <= 0:
                    raise
                # The last try comes as the lease ends, not a back-off step before it.
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
                continue
            if extends_lease:
                self._lease_holds_until = sent + self.lease_seconds
            return result


def _count(batch: Sequence[Event]) -> None:
    """Metrics of an appended batch, whoever wrote it (a worker, the sweeper, the api)."""
    tokens = sum(e.data.get("tokens", 0) for e in batch if e.type is EventType.TOKEN)
    if tokens:
        metrics.TOKENS_GENERATED.inc(tokens)
    status = final_status(batch[-1])
    if status is not None:
        metrics.STREAMS_FINISHED.labels(status.value).inc()
