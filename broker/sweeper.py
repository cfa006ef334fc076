"""The lease sweeper: every generation ends, also when the worker writing it dies.

A worker holds a lease on each generation it writes and renews it (``BROKER_LEASE_SECONDS``,
renewed every third of the lease, or more often when ``BROKER_CANCEL_POLL_MS`` asks). A
worker that is killed, or stalls past its lease, stops renewing. Every api and worker
process runs a sweeper that, every ``BROKER_SWEEP_SECONDS``, looks in the lease index
(``keys.LEASES_KEY``) for generations whose lease lapsed, and for each one:

- takes it over in one atomic step (``scripts.TAKE_OVER``): the attempt number goes up, so
  the old writer is fenced and can never append again, even if it wakes up later;
- ends it: ``error`` / ``worker_lost`` (``retryable: true``: the client may send the request
  again), or ``done`` / ``cancelled`` if a client had asked to cancel. What readers already
  received stands; nothing is generated again, so no later event can contradict it.

So a stream whose worker died ends within about one lease plus one sweep interval, instead of
when arq re-runs the job (after its in-progress key expires). Several sweepers may run
at once; the atomic take-over means each generation is ended once.

Unless its route continues generations (``BROKER_ROUTES``: ``PATTERN=PROVIDER:MODE``, the fake
model's default): then, instead of ending it, the sweeper hands it over
(``GenerationLog.hand_over``): a continuation's job is queued, and a worker continues the same
stream after its last event (``workers.continuation``). A cancel asked for still ends it
(``cancelled``), and so does a generation past ``BROKER_MAX_CONTINUATIONS`` (``worker_lost``)
or whose continuation no worker claimed within ``BROKER_QUEUE_TIMEOUT_SECONDS``
(``queue_timeout``). A continuation no worker claimed within
``generation_log.HANDOVER_PICKUP_SECONDS`` is swept again and its job queued anew, under the
same number.

A generation no worker ever started is in the index too, due when its arq job expires
(``BROKER_QUEUE_TIMEOUT_SECONDS``): arq drops an expired job without running it, so the
sweeper ends the generation then, with ``error`` / ``queue_timeout``.

A generation last written under another store epoch (the store failed over or restarted
since) may have had events past its ``last_seq`` that readers received and the store lost.
The take-over records ``last_seq + 1`` as lost in the same step, and the sweeper ends it with
``error`` / ``log_lost`` (retryable): whoever holds an id from there on is answered 410 on
resume, never 204 or other text under that id. (A cancel a client asked for is still
honoured as ``done`` / ``cancelled``; the record of the loss protects the readers all the
same.) A claim refuses such a generation (``scripts.CLAIM``), so this is where it ends.

Deadlines are compared on Redis's clock (``scripts``), so hosts whose clocks disagree cannot
take over each other's live generations.

Each generation a sweep ends is counted by how it ended it
(``streambroker_lease_takeovers_total{outcome}``: ``worker_lost``, ``queue_timeout``,
``log_lost``, ``cancelled``), and a ``worker_lost`` in ``streambroker_workers_lost_total``
too (which a job that finds an earlier attempt's events also counts: ``workers.generate``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker import events, metrics, structured_logs
from broker.errors import GenerationEnded, GenerationNotFound, StaleWriter, StoreUnavailable
from broker.events import Event
from broker.generation_log import Claim, GenerationLog, HandOver
from broker.routing import continuation_mode
from broker.setting_fields import Continuation, Route
from broker.state import GenerationState, Status, now_ms

if TYPE_CHECKING:
    from broker.settings import GenerationSettings

logger = logging.getLogger("streambroker.sweeper")

#: Generations taken from the index per sweep; more wait for the next one.
SWEEP_BATCH = 100

WORKER_LOST = "the worker running this generation stopped responding; retry the request"
QUEUE_TIMEOUT = "no worker started this generation before its job expired; retry the request"
TIMELINE_LOST = (
    "the store failed over or restarted while this generation's writer was gone, and may have "
    "lost events that were already sent; retry the request"
)


def _error_code(claim: Claim) -> str:
    """The error a swept generation ends with when no cancel was asked for."""
    if claim.timeline_changed:
        return "log_lost"
    if claim.was is Status.QUEUED:
        return "queue_timeout"
    return "worker_lost"


_MESSAGES = {"log_lost": TIMELINE_LOST, "queue_timeout": QUEUE_TIMEOUT, "worker_lost": WORKER_LOST}

CONTINUATION_LIMIT = (
    "the workers running this generation stopped responding, and it was continued "
    "{count} times already (BROKER_MAX_CONTINUATIONS); retry the request"
)
CONTINUATION_UNCLAIMED = (
    "its worker stopped responding, and no worker picked up its continuation before it "
    "expired; retry the request"
)


@dataclass(frozen=True)
class Ending:
    """How a sweep ends a generation: ``cancelled`` (the cancel a client asked for, with the
    ``usage`` of what was streamed before), or the retryable error ``code`` with ``message``."""

    code: str
    message: str = ""
    usage: dict[str, int] = field(default_factory=lambda: dict(events.NO_USAGE))

    @property
    def cancelled(self) -> bool:
        return self.code == "cancelled"

    def event(self, t: int) -> Event:
        if self.cancelled:
            return events.done("cancelled", self.usage, t=t)
        return events.error(self.code, self.message, retryable=True, t=t)


CANCELLED = Ending("cancelled")


def _ending(claim: Claim) -> Ending:
    """The end a swept generation gets when it is not handed over: the cancel a client asked
    for, else ``log_lost`` (its timeline may be lost), ``queue_timeout`` (it never started)
    or ``worker_lost``."""
    if claim.cancel_requested:
        return CANCELLED
    code = _error_code(claim)
    return Ending(code, _MESSAGES[code])


def _count_end(ending: Ending) -> None:
    metrics.LEASE_TAKEOVERS.labels(ending.code).inc()
    if ending.code == "worker_lost":
        metrics.WORKERS_LOST.inc()


class LeaseSweeper:
    def __init__(
        self,
        log: GenerationLog,
        *,
        owner: str,
        lease_seconds: float,
        routes: Sequence[Route] = (),
        max_continuations: int = 0,
    ) -> None:
        self.log = log
        #: Recorded as the generation's worker while the sweeper ends it.
        self.owner = f"sweeper:{owner}"
        self.lease_seconds = lease_seconds
        #: Which models continue (none without routes) and how often one generation may.
        self.routes = routes
        self.max_continuations = max_continuations

    @classmethod
    def from_settings(
        cls, log: GenerationLog, *, owner: str, settings: GenerationSettings
    ) -> LeaseSweeper:
        return cls(
            log,
            owner=owner,
            lease_seconds=settings.lease_seconds,
            routes=settings.routes,
            max_continuations=settings.max_continuations,
        )

    async def sweep_once(self, *, now: int | None = None) -> list[str]:
        """One pass over the lapsed leases; returns the generations this sweeper ended.

        Lapsed by Redis's clock; ``now`` (ms) stands in for it in tests."""
        ended = []
        for stream_id in await self.log.lapsed_leases(limit=SWEEP_BATCH, now=now):
            found = await self.log.take_over(
                stream_id, owner=self.owner, lease_seconds=self.lease_seconds, now=now
            )
            if found.outcome == "live":
                # The writer renewed after the index entry was last moved.
                await self.log.index_lease(stream_id, found.lease_until_ms)
                continue
            if found.outcome == "ended":  # its writer's own ``ended`` step was lost
                await self.log.ended(stream_id)
                continue
            if found.claim is None:  # gone: nothing left to watch
                await self.log.unindex_lease(stream_id)
                continue
            try:
                ending = await self._hand_over(stream_id, found.claim)
                if ending is None:
                    continue  # handed over, or no longer this sweep's
                if ending.cancelled:
                    usage = await self.log.streamed_usage(stream_id, found.claim)
                    ending = dataclasses.replace(ending, usage=usage)
                state = await self.log.end_claimed(stream_id, found.claim, ending.event)
            except GenerationNotFound:
                await self.log.unindex_lease(stream_id)  # expired or deleted in between
                continue
            if state is None:
                # A writer claimed it back (its own index entry must stay: it is how a sweep
                # finds the generation if that writer dies too), or it ended meanwhile (its
                # end removed the entry).
                continue
            ended.append(stream_id)  # the terminal append removed the index entry
            _count_end(ending)
            self._log_end(stream_id, state, found.claim, ending, now_ms() if now is None else now)
        return ended

    async def _hand_over(self, stream_id: str, claim: Claim) -> Ending | None:
        """Hand a generation whose writer was lost over to a continuation when its route
        continues; returns the end to write instead, or None when there is none to write
        (handed over, or claimed back by a worker meanwhile). ``GenerationNotFound`` when it
        is gone."""
        continuable = not (claim.cancel_requested or claim.timeline_changed)
        if not continuable or claim.was is not Status.RUNNING:
            return _ending(claim)
        if continuation_mode(await self.log.model_of(stream_id), self.routes) is Continuation.OFF:
            metrics.HANDOVERS.labels("worker_lost", "ended").inc()
            return _ending(claim)
        try:
            handed = await self.log.hand_over(
                stream_id,
                claim.attempt,
                reason="worker_lost",
                max_continuations=self.max_continuations,
            )
        except (StaleWriter, GenerationEnded):
            return None
        if handed.outcome == "queued":
            self._log_hand_over(stream_id, claim, handed)
            return None
        if handed.outcome == "cancel":
            metrics.HANDOVERS.labels("worker_lost", "cancelled").inc()
            return CANCELLED
        metrics.HANDOVERS.labels("worker_lost", "ended").inc()
        if handed.outcome == "limit":
            return Ending("worker_lost", CONTINUATION_LIMIT.format(count=handed.number))
        return Ending("queue_timeout", CONTINUATION_UNCLAIMED)

    def _log_hand_over(self, stream_id: str, claim: Claim, handed: HandOver) -> None:
        """Count and log a continuation this sweep queued: once when it is handed over,
        then only logged when its job is queued again (no worker claimed it in time)."""
        if handed.new:
            metrics.HANDOVERS.labels(handed.reason, "queued").inc()
        structured_logs.step(
            "handed_over" if handed.new else "requeued",
            stream_id,
            level=logging.WARNING,
            attempt=claim.attempt,
            by=self.owner,
            reason=handed.reason,
            continuation=handed.number,
        )

    def _log_end(
        self, stream_id: str, state: GenerationState, claim: Claim, ending: Ending, now: int
    ) -> None:
        """``taken_over`` and ``finished``, for a generation this sweep ended (``state``: as it
        was read just before)."""
        fields: dict[str, Any] = {
            "attempt": claim.attempt,
            "by": self.owner,
            "tenant": state.tenant or None,
            "model": state.model,
        }
        if state.started_at_ms is not None:
            fields["duration_ms"] = now - state.started_at_ms
        structured_logs.step("taken_over", stream_id, level=logging.WARNING, **fields)
        if claim.timeline_changed:
            # As the writer's own ``log_lost`` line, with what is known: readers may hold
            # events from ``lost_from_seq`` on that the store no longer has.
            structured_logs.step(
                "log_lost",
                stream_id,
                level=logging.ERROR,
                **fields,
                lost_from_seq=claim.last_seq + 1,
                reason="store_epoch_changed",
            )
        if ending.cancelled:
            structured_logs.step(
                "finished", stream_id, status="cancelled", finish_reason="cancelled", **fields
            )
        else:
            structured_logs.step(
                "finished", stream_id, status="failed", error=ending.code, **fields
            )

    async def run(self, interval: float) -> None:
        """Sweep every ``interval`` seconds until cancelled; Redis trouble only skips a pass."""
        while True:
            try:
                await self.sweep_once()
            except StoreUnavailable as exc:
                logger.warning("lease sweep skipped: %s", exc)
            except Exception:
                logger.exception("lease sweep failed")
            await asyncio.sleep(interval)
