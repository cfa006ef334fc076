"""How an attempt that failed ends: which terminal event, which log line, which status.

Whatever escapes a running attempt is classified here, and each kind has one answer:

- ``fenced`` (``StaleWriter``, ``GenerationEnded``): another attempt owns the generation,
  or it already ended; nothing more is written, the end is theirs.
- ``gone`` (``GenerationNotFound``): it expired or was deleted while running.
- ``log_lost`` (a ``SequenceConflict`` with the log behind the writer): Redis lost events
  after they were appended, and readers may hold text the log no longer has; the loss is
  recorded, and the api answers resumes past it with ``log_lost``.
- ``store_unavailable``: Redis was away for longer than the lease (the writer retried
  until then).
- ``internal_error``: anything else, with its traceback logged.

Every end written here is a retryable error (the client retries the request: a new
generation) and is best effort, since the store may be what failed. The status is what
arq keeps as the job's result, for operators.
"""

from __future__ import annotations

import logging
from typing import Any

from broker import structured_logs
from broker.errors import (
    GenerationEnded,
    GenerationNotFound,
    SequenceConflict,
    StaleWriter,
    StoreUnavailable,
)
from broker.events import Event
from broker.generation_log import GenerationLog
from workers.attempt_output import AttemptOutput

logger = logging.getLogger("streambroker.worker")


def worker_stopped(output: AttemptOutput) -> Event:
    """The end of a generation whose worker stopped without handing it over."""
    return output.error(
        "worker_stopped",
        "the worker stopped before the generation finished; retry the request",
        retryable=True,
    )


class AttemptFailures:
    """Ends one attempt's generation after a failure, as the failure calls for."""

    def __init__(
        self,
        output: AttemptOutput,
        log: GenerationLog,
        *,
        lease_seconds: float,
        about: dict[str, Any],
    ) -> None:
        self._output = output
        self._log = log
        self._stream_id = output.writer.stream_id
        self._lease_seconds = lease_seconds
        #: The fields of every lifecycle line (``log_lost`` is written here).
        self._about = about

    async def end(self, exc: Exception) -> str:
        """End the generation after ``exc``, unless it is no longer this attempt's to end;
        returns the run's status. Call it while ``exc`` is being handled: an unexpected
        failure is logged with its traceback."""
        if isinstance(exc, StaleWriter | GenerationEnded):
            return self._fenced(exc)
        if isinstance(exc, GenerationNotFound):
            return self._gone()
        if isinstance(exc, SequenceConflict):
            return await self._after_conflict(exc)
        if isinstance(exc, StoreUnavailable):
            return await self._store_unavailable(exc)
        return await self._internal_error()

    async def stopped(self) -> None:
        """arq's job timeout or a worker shutdown: end the stream so no reader waits forever."""
        await self._output.end_quietly(worker_stopped(self._output))

    def _fenced(self, exc: StaleWriter | GenerationEnded) -> str:
        logger.warning(
            "generation %s: stopped writing: %s",
            self._stream_id,
            exc,
            extra={"stream_id": self._stream_id, "attempt": self._output.writer.attempt},
        )
        return "fenced"

    def _gone(self) -> str:
        logger.info(
            "generation %s expired or was deleted while running",
            self._stream_id,
            extra={"stream_id": self._stream_id},
        )
        return "gone"

    async def _after_conflict(self, conflict: SequenceConflict) -> str:
        if conflict.actual_last >= conflict.expected - 1:
            return await self._internal_error()  # the log is ahead, not behind: not a loss
        # The log is shorter than what this writer appended: Redis lost its last writes
        # (a crash before they reached disk, or a failover to a replica that lagged).
        first_lost, last_lost = conflict.actual_last + 1, conflict.expected - 1
        logger.error(
            "generation %s: Redis lost events %d-%d after they were appended",
            self._stream_id,
            first_lost,
            last_lost,
            extra={"stream_id": self._stream_id},
        )
        structured_logs.step(
            "log_lost",
            self._stream_id,
            level=logging.ERROR,
            **self._about,
            lost_from_seq=first_lost,
            lost_to_seq=last_lost,
        )
        try:
            await self._output.writer.mark_lost(first_lost)
        except StoreUnavailable:
            # The end would land at the first lost id, unmarked: a reader holding that id
            # would take it for the end of what it has (a 204). Leave the end to a sweeper,
            # which records the loss itself when the store's epoch changed.
            logger.error(
                "generation %s: could not record the loss; left to the sweeper",
                self._stream_id,
                extra={"stream_id": self._stream_id},
            )
            return "log_lost"
        await self._output.end_quietly(
            self._output.error(
                "log_lost",
                "the store lost part of this answer after it was sent (a Redis crash or "
                "failover); retry the request",
                retryable=True,
            )
        )
        return "log_lost"

    async def _store_unavailable(self, exc: StoreUnavailable) -> str:
        logger.error(
            "generation %s: Redis unreachable for longer than the lease: %s",
            self._stream_id,
            exc,
            extra={"stream_id": self._stream_id},
        )
        await self._output.end_quietly(
            self._output.error(
                "store_unavailable",
                "the store was unreachable for longer than the worker's lease "
                f"({self._lease_seconds:g} s); retry the request",
                retryable=True,
            )
        )
        return "store_unavailable"

    async def _internal_error(self) -> str:
        logger.exception(
            "generation %s: unexpected failure",
            self._stream_id,
            extra={"stream_id": self._stream_id},
        )
        await self._output.end_quietly(
            self._output.error(
                "internal_error",
                "the broker failed while generating; retry the request",
                retryable=True,
            )
        )
        return "internal_error"
