"""The ``generate`` job: run one generation from its provider into the log.

Shape of a run::

    claim (new attempt = fencing token) ─▶ metadata ─▶ provider chunks ─▶ batched token /
    tool_call / progress appends ─▶ exactly one terminal event (done | error)

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
from dataclasses import dataclass
from typing import Any

from arq.worker import Retry

from broker import events, metrics, structured_logs
from broker.errors import ClaimRefused, GenerationEnded, GenerationNotFound, StoreUnavailable
from broker.events import EventType
from broker.generation_log import RECORD_PENDING_MS, Claim, GenerationLog, final_status
from broker.request import GenerationRequest
from broker.settings import GenerationSettings
from broker.state import GenerationState, Status, now_ms
from workers.attempt_failures import AttemptFailures
from workers.attempt_output import AttemptOutput
from workers.providers import Providers
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


async def generate(ctx: dict[str, Any], stream_id: str) -> str:
    """arq entry point. Returns how the run ended (kept briefly by arq, for operators)."""
    runtime: WorkerRuntime = ctx["runtime"]
    enqueued_ms = int(ctx["enqueue_time"].timestamp() * 1000)
    with metrics.JOBS_IN_FLIGHT.track_inprogress():
        return await GenerationJob(runtime, stream_id, enqueued_ms=enqueued_ms).run()


class GenerationJob:
    """One run of the job: claim the generation, write one attempt, end it exactly once."""

    def __init__(self, runtime: WorkerRuntime, stream_id: str, *, enqueued_ms: int = 0) -> None:
        self.runtime = runtime
        #: When the job was queued (ms since 1970; 0: long ago).
        self.enqueued_ms = enqueued_ms
        self.settings = runtime.settings
        self.log = runtime.log
        self.stream_id = stream_id
        # For the lifecycle lines (broker.structured_logs.step), none of which costs a Redis
        # call: the fields all of them carry, then the figures of the finished line.
        self.about: dict[str, Any] = {}
        self.tokens = TokenFigures()

    async def run(self) -> str:
        """Run the generation; returns how the run ended: ``skipped`` (not claimed),
        ``completed``, ``failed`` (the provider's error), ``cancelled``, ``worker_lost``,
        ``unroutable_model``, or the status of a failure (``workers.attempt_failures``)."""
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
        queue_ms = max(0, now_ms() - state.created_at_ms)
        metrics.JOB_PICKUP.observe(queue_ms / 1000)
        # queue_ms: from the create to this claim (for a first attempt, the pickup latency).
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
            return await self._end_after_earlier_attempt(output, claim)
        await output.append(events.metadata(state, attempt=claim.attempt, t=output.t()))
        if claim.cancel_requested:
            await output.append(events.done("cancelled", events.NO_USAGE, t=output.t()))
            return "cancelled"
        return await self._generate(output, state)

    async def _end_after_earlier_attempt(self, output: AttemptOutput, claim: Claim) -> str:
        """An earlier attempt wrote events and died. Generating again could contradict text
        that readers already saw, so end the stream: as the client asked, if it asked to
        cancel; else with an error that lets it retry."""
        if claim.cancel_requested:
            await output.append(events.done("cancelled", events.NO_USAGE, t=output.t()))
            return "cancelled"
        await output.append(
            output.error(
                "worker_lost",
                "the worker running this generation stopped; retry the request",
                retryable=True,
            )
        )
        metrics.WORKERS_LOST.inc()
        return "worker_lost"

    async def _generate(self, output: AttemptOutput, state: GenerationState) -> str:
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
        relay = StreamRelay(output, self.settings, request, figures=self.tokens, about=self.about)
        ended = await relay.run(provider)
        if ended == "failed" and output.terminal is not None:
            # The provider's error, now the stream's end (the relay appended it).
            error = output.terminal.data
            metrics.count_provider_error(str(error["code"]), retryable=bool(error["retryable"]))
        return ended

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
        tokens = (usage or {}).get("completion_tokens") or self.tokens.count
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
