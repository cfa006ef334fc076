"""The ``generate`` job: run one generation from its provider into the log.

Shape of a run::

    claim (new attempt = fencing token) ─▶ metadata ─▶ provider chunks ─▶ batched token /
    tool_call / progress appends ─▶ exactly one terminal event (done | error)

A claim that finds events of an earlier attempt (its worker was lost, or stopped for a
deploy) continues the stream after them instead (``workers.continuation``)::

    claim ─▶ read what earlier attempts wrote ─▶ resumed ─▶ the provider's continuation ─▶ …

A worker that is stopping (SIGTERM: ``workers.worker``) tells its relays to hand over: each
appends the tokens it holds and hands its generation over to a continuation at once
(``GenerationLog.hand_over``), which another worker picks up from the queue.

This module is the run itself: the claim, what an attempt does before it generates (an
earlier attempt wrote events, the client already cancelled, no provider serves the model),
and the lifecycle lines. The provider's answer is relayed into the log by
``workers.stream_relay``; a failure is turned into the stream's end by
``workers.attempt_failures``. Every append goes through the attempt's fenced writer
(``workers.attempt_output``): when another attempt owns the generation, or it already
ended, the job stops without writing anything more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from arq.worker import Retry

from broker import events, metrics, structured_logs
from broker.earlier_attempts import EarlierAttempts, read_earlier, streamed_usage
from broker.errors import ClaimRefused, GenerationEnded, GenerationNotFound, StoreUnavailable
from broker.events import EventType
from broker.generation_log import RECORD_PENDING_MS, Claim, GenerationLog, final_status
from broker.request import GenerationRequest
from broker.routing import continuation_mode
from broker.setting_fields import Continuation
from broker.settings import GenerationSettings
from broker.state import GenerationState, Status, now_ms
from workers.attempt_failures import AttemptFailures, worker_stopped
from workers.attempt_output import AttemptOutput
from workers.continuation import stopped_message, why_not_continued
from workers.providers import Providers
from workers.providers.base import Provider, Resume
from workers.stream_relay import StreamRelay, TokenFigures

logger = logging.getLogger("streambroker.worker")

#: How long a claim keeps trying while Redis is unreachable (a failover takes a few seconds)
#: before the job goes back to arq, which runs it again ``CLAIM_RETRY_SECONDS`` later. Each
#: run spends one of arq's few tries: a job that spent them is dropped, its generation left
#: queued, so a short outage is ridden out here instead.
CLAIM_RIDE_OUT_SECONDS = 15.0
CLAIM_RETRY_SECONDS = 1.0
#: A job taken before its generation's record was written (on a Redis Cluster the api queues
#: the job first: ``GenerationLog.create`` says why) looks for the record again until
#: ``RECORD_PENDING_MS`` after it was queued, then is dropped: its create never finished.
#: The first pause before looking again; it doubles up to the last one.
RECORD_RECHECK_SECONDS = (0.01, 0.25)
#: The same while Redis is unreachable at claim.
STORE_RECHECK_SECONDS = (0.1, 1.0)


@dataclass
class WorkerRuntime:
    """What every job of one worker process shares; built in arq's ``on_startup``."""

    log: GenerationLog
    providers: Providers
    settings: GenerationSettings
    worker_id: str
    #: The process is stopping (``stop``): no job starts relaying, every relay hands over.
    stopping: bool = False
    #: The relays running now, which ``stop`` tells to hand over.
    relays: set[StreamRelay] = field(default_factory=set)

    def stop(self) -> None:
        """The worker is shutting down: every generation it runs is handed over to a
        continuation as soon as its current batch is appended."""
        self.stopping = True
        for relay in list(self.relays):
            relay.hand_over()


async def generate(ctx: dict[str, Any], stream_id: str, continuation: int = 0) -> str:
    """arq entry point: the generation's first job, or its ``continuation``-th continuation's
    (``keys.continuation_job_id``). Returns how the run ended (kept briefly by arq, for
    operators)."""
    runtime: WorkerRuntime = ctx["runtime"]
    enqueued_ms = int(ctx["enqueue_time"].timestamp() * 1000)
    job = GenerationJob(runtime, stream_id, enqueued_ms=enqueued_ms, continuation=continuation)
    with metrics.JOBS_IN_FLIGHT.track_inprogress():
        return await job.run()


class GenerationJob:
    """One run of the job: claim the generation, write one attempt, end it exactly once."""

    def __init__(
        self,
        runtime: WorkerRuntime,
        stream_id: str,
        *,
        enqueued_ms: int = 0,
        continuation: int = 0,
    ) -> None:
        self.runtime = runtime
        #: When the job was queued (ms since 1970; 0: long ago).
        self.enqueued_ms = enqueued_ms
        #: The continuation this job was queued for (0: the generation's first job).
        self.continuation = continuation
        self.settings = runtime.settings
        self.log = runtime.log
        self.stream_id = stream_id
        # For the lifecycle lines (broker.structured_logs.step), none of which costs a Redis
        # call: the fields all of them carry, then the figures of the finished line.
        self.about: dict[str, Any] = {}
        self.tokens = TokenFigures()
        #: A continuation: the tokens earlier attempts wrote.
        self.earlier_tokens = 0

    async def run(self) -> str:
        """Run the generation; returns how the run ended: ``skipped`` (not claimed),
        ``completed``, ``failed`` (the provider's error), ``cancelled``, ``handed_over``,
        ``worker_lost`` / ``worker_stopped`` (not continued), ``unroutable_model``, or the
        status of a failure (``workers.attempt_failures``)."""
        claimed = await self._claim()
        if claimed is None:
            return "skipped"
        claim, state = claimed
        claimed_at = self._start(claim, state)
        writer = self.log.writer(self.stream_id, claim, lease_seconds=self.settings.lease_seconds)
        output = AttemptOutput(writer, origin_ms=state.created_at_ms)
        failures = AttemptFailures(
            output, self.log, lease_seconds=self.settings.lease_seconds, about=self.about
        )
        try:
            return await self._attempt(output, claim, state)
        except asyncio.CancelledError:
            # Shielded: the end must be written although this task is being cancelled.
            await asyncio.shield(failures.stopped())
            raise
        except Exception as exc:
            # Inside the handler, so that an unexpected failure is logged with its traceback.
            return await failures.end(exc)
        finally:
            metrics.GENERATION_DURATION.observe(time.monotonic() - claimed_at)
            self._log_finished(output, claimed_at)

    async def _claim(self) -> tuple[Claim, GenerationState] | None:
        """A new attempt at the generation, and its state; None when it is not to be run.

        Looks again, with growing pauses, while the record may still be on its way, and
        while Redis is unreachable, for up to ``CLAIM_RIDE_OUT_SECONDS``; then the job
        goes back to arq (``Retry``). No event was written either way, and a claim that
        did land is simply claimed again (the attempt goes up).
        """
        pause = RECORD_RECHECK_SECONDS[0]
        away_since: float | None = None
        while True:
            try:
                return await self._claim_once()
            except GenerationNotFound as exc:
                if now_ms() - self.enqueued_ms >= RECORD_PENDING_MS:
                    self._not_run(exc)
                    return None
                pause_cap = RECORD_RECHECK_SECONDS[1]
            except StoreUnavailable as exc:
                if away_since is None:
                    away_since = time.monotonic()
                    logger.warning(
                        "generation %s: Redis unreachable at claim, retrying: %s",
                        self.stream_id,
                        exc,
                    )
                elif time.monotonic() - away_since >= CLAIM_RIDE_OUT_SECONDS:
                    raise Retry(defer=CLAIM_RETRY_SECONDS) from exc
                pause = max(pause, STORE_RECHECK_SECONDS[0])
                pause_cap = STORE_RECHECK_SECONDS[1]
            await asyncio.sleep(pause)
            pause = min(pause * 2, pause_cap)

    async def _claim_once(self) -> tuple[Claim, GenerationState] | None:
        """The claim; ``GenerationNotFound`` when the generation has no record."""
        try:
            claim = await self.log.claim(
                self.stream_id,
                worker=self.runtime.worker_id,
                lease_seconds=self.settings.lease_seconds,
                continuation=self.continuation,
            )
            state = await self.log.get(self.stream_id)
        except (GenerationEnded, ClaimRefused) as exc:
            self._not_run(exc)
            return None
        return claim, state

    def _not_run(self, why: Exception) -> None:
        logger.info(
            "generation %s not run: %s", self.stream_id, why, extra={"stream_id": self.stream_id}
        )

    def _start(self, claim: Claim, state: GenerationState) -> float:
        """Set the fields every lifecycle line carries, observe the pickup latency and write
        the ``started`` line; returns when the attempt started (monotonic)."""
        self.about = {
            "tenant": state.tenant or None,
            "model": state.model,
            "attempt": claim.attempt,
        }
        claimed_at = time.monotonic()
        # A continuation's job was queued at its hand-over, long after the create.
        queued_at = self.enqueued_ms if self.continuation else state.created_at_ms
        queue_ms = max(0, now_ms() - queued_at)
        metrics.JOB_PICKUP.observe(queue_ms / 1000)
        # queue_ms: from the create (a continuation: its hand-over) to this claim.
        structured_logs.step(
            "started",
            self.stream_id,
            **self.about,
            queue_ms=queue_ms,
            worker=self.runtime.worker_id,
        )
        return claimed_at

    async def _attempt(self, output: AttemptOutput, claim: Claim, state: GenerationState) -> str:
        if claim.last_seq > 0:
            return await self._continue(output, claim, state)
        await output.append(events.metadata(state, attempt=claim.attempt, t=output.t()))
        if claim.cancel_requested:
            await output.append(events.done("cancelled", events.NO_USAGE, t=output.t()))
            return "cancelled"
        if claim.lost_continuations > self.settings.max_continuations:
            # Its workers were lost before it wrote anything, too often: a request that kills
            # every worker that runs it.
            why = f"its workers were lost {claim.lost_continuations} times"
            return await self._end_not_continued(output, claim, why)
        return await self._generate(output, state, claim)

    async def _continue(self, output: AttemptOutput, claim: Claim, state: GenerationState) -> str:
        """An earlier attempt wrote events and stopped: continue after them, or end the
        stream explicitly where continuing is not allowed (``workers.continuation``)."""
        earlier = await read_earlier(self.log, self.stream_id, claim.last_seq)
        self.earlier_tokens = earlier.tokens
        if claim.cancel_requested:
            usage = streamed_usage(earlier.tokens)
            await output.append(events.done("cancelled", usage, t=output.t()))
            return "cancelled"
        mode = continuation_mode(state.model, self.settings.routes)
        why = why_not_continued(
            claim, mode, earlier, max_continuations=self.settings.max_continuations
        )
        if why is not None:
            return await self._end_not_continued(output, claim, why)
        reason = claim.reason or "worker_lost"
        await output.append(
            events.resumed(
                attempt=claim.attempt, after_event_id=claim.last_seq, reason=reason, t=output.t()
            )
        )
        metrics.CONTINUATIONS.labels(reason).inc()
        structured_logs.step(
            "resumed", self.stream_id, **self.about, after_event_id=claim.last_seq, reason=reason
        )
        return await self._generate(output, state, claim, earlier=earlier, mode=mode)

    async def _end_not_continued(self, output: AttemptOutput, claim: Claim, why: str) -> str:
        """End a stream an earlier attempt wrote to, which may not be continued: with the
        error of the way that attempt stopped (retryable: the client may send it again)."""
        reason = claim.reason or "worker_lost"
        await output.append(output.error(reason, stopped_message(reason, why), retryable=True))
        if reason == "worker_lost":
            metrics.WORKERS_LOST.inc()
        return reason

    async def _generate(
        self,
        output: AttemptOutput,
        state: GenerationState,
        claim: Claim,
        *,
        earlier: EarlierAttempts | None = None,
        mode: Continuation = Continuation.OFF,
    ) -> str:
        request = GenerationRequest.from_dict(state.request)
        provider = self.runtime.providers.for_model(request.model)
        if provider is None:
            await output.append(
                output.error(
                    "unroutable_model",
                    f"no provider serves model {request.model!r}",
                    retryable=False,
                )
            )
            return "unroutable_model"
        resume = None if earlier is None else Resume(earlier.text, earlier.tokens, mode)
        relay = StreamRelay(
            output,
            self.settings,
            request,
            figures=self.tokens,
            about=self.about,
            resume=resume,
            seam_from_t=None if earlier is None else earlier.last_t,
        )
        ended = await self._relay(relay, provider)
        if ended == "handed_over":
            return await self._hand_over(output, claim, state, relay.usage())
        if ended == "failed" and output.terminal is not None:
            # The provider's error, now the stream's end (the relay appended it).
            error = output.terminal.data
            metrics.count_provider_error(str(error["code"]), retryable=bool(error["retryable"]))
        return ended

    async def _relay(self, relay: StreamRelay, provider: Provider) -> str:
        """Run the relay, where a stopping worker can tell it to hand over."""
        if self.runtime.stopping:
            return "handed_over"  # stopped before it began: nothing to append first
        self.runtime.relays.add(relay)
        try:
            return await relay.run(provider)
        finally:
            self.runtime.relays.discard(relay)

    async def _hand_over(
        self, output: AttemptOutput, claim: Claim, state: GenerationState, usage: dict[str, int]
    ) -> str:
        """This worker is stopping: hand the generation over to a continuation, which
        another worker picks up at once (``worker_stopped``); or end it as before where its
        route does not continue, or as a cancel asked for (``usage``: the answer's so far).
        Once handed over, this attempt is fenced: nothing it could still try to append (a
        second signal cancelling it, say) lands."""
        if continuation_mode(state.model, self.settings.routes) is Continuation.OFF:
            await output.append(worker_stopped(output))
            metrics.HANDOVERS.labels("worker_stopped", "ended").inc()
            return "worker_stopped"
        handed = await self.log.hand_over(
            self.stream_id,
            claim.attempt,
            reason="worker_stopped",
            max_continuations=self.settings.max_continuations,
        )
        if handed.outcome == "queued":
            metrics.HANDOVERS.labels("worker_stopped", "queued").inc()
            structured_logs.step(
                "handed_over",
                self.stream_id,
                **self.about,
                reason="worker_stopped",
                continuation=handed.number,
                after_event_id=output.writer.next_seq - 1,
                job_queued=handed.job_queued,
            )
            return "handed_over"
        if handed.outcome == "cancel":
            metrics.HANDOVERS.labels("worker_stopped", "cancelled").inc()
            await output.append(events.done("cancelled", usage, t=output.t()))
            return "cancelled"
        # Not reached while only lost workers count against the limit; ended as before.
        metrics.HANDOVERS.labels("worker_stopped", "ended").inc()
        await output.append(worker_stopped(output))
        return "worker_stopped"

    def _log_finished(self, output: AttemptOutput, claimed_at: float) -> None:
        """The ``finished`` line, when this attempt's terminal event is the one in the log
        (a fenced attempt leaves it to whoever ended the generation)."""
        terminal = output.terminal
        if terminal is None:
            return
        ended_at = time.monotonic()
        data = terminal.data
        status = final_status(terminal)
        usage = data.get("usage") if terminal.type is EventType.DONE else None
        # This attempt's own tokens (a continuation's usage adds up the earlier ones).
        tokens = ((usage or {}).get("completion_tokens") or 0) - self.earlier_tokens
        tokens = tokens if tokens > 0 else self.tokens.count
        first_at = self.tokens.first_at
        rate = None
        if tokens and first_at is not None and ended_at > first_at:
            rate = round(tokens / (ended_at - first_at), 1)
        structured_logs.step(
            "finished",
            self.stream_id,
            level=logging.WARNING if status is Status.FAILED else logging.INFO,
            **self.about,
            status=status.value if status is not None else None,
            finish_reason=data.get("finish_reason"),
            error=data.get("code") if terminal.type is EventType.ERROR else None,
            duration_ms=round((ended_at - claimed_at) * 1000),
            ttft_ms=self.tokens.ttft_ms,
            tokens=tokens,
            tokens_per_second=rate,
            events=output.writer.next_seq - 1,
        )
