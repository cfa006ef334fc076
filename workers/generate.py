"""The ``generate`` job: run one generation from its provider into the log.

Shape of a run::

    claim (new attempt = fencing token) ─▶ metadata ─▶ provider chunks ─▶ batched token /
    tool_call / progress appends ─▶ exactly one terminal event (done | error)

The provider is read by a separate task into a bounded queue, so the append loop can flush
on time (batch windows, progress cadence, cancel polls) even while the provider is silent,
and cancelling that task closes the provider's stream (``aclosing``), which closes the
upstream request. Every append goes through the fenced ``LogWriter``: when another attempt
owns the generation, or it already ended, the job stops without writing anything more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from arq.worker import Retry

from broker import events, metrics, structured_logs
from broker.errors import (
    ClaimRefused,
    GenerationEnded,
    GenerationNotFound,
    SequenceConflict,
    StaleWriter,
    StoreUnavailable,
)
from broker.events import Event, EventType
from broker.generation_log import GenerationLog, LogWriter, final_status
from broker.request import GenerationRequest
from broker.settings import GenerationSettings
from broker.state import GenerationState, Status, now_ms
from workers.batching import TokenBatcher
from workers.progress import ProgressTracker
from workers.providers import Providers
from workers.providers.base import (
    Chunk,
    Finish,
    Provider,
    ProviderError,
    TextDelta,
    ToolCallDelta,
    Usage,
)

logger = logging.getLogger("streambroker.worker")

#: Chunks the provider may run ahead of the appends before it waits (backpressure).
_QUEUE_SIZE = 1024


@dataclass
class WorkerRuntime:
    """What every job of one worker process shares; built in arq's ``on_startup``."""

    log: GenerationLog
    providers: Providers
    settings: GenerationSettings
    worker_id: str


class _End:
    """Queue marker: the provider finished (``error`` set when it failed)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


#: How long a job whose claim found Redis unreachable waits before arq runs it again.
CLAIM_RETRY_SECONDS = 1.0


async def generate(ctx: dict[str, Any], stream_id: str) -> str:
    """arq entry point. Returns how the run ended (kept briefly by arq, for operators)."""
    runtime: WorkerRuntime = ctx["runtime"]
    return await GenerationJob(runtime, stream_id).run()


class GenerationJob:
    def __init__(self, runtime: WorkerRuntime, stream_id: str) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.log = runtime.log
        self.stream_id = stream_id
        self.origin_ms = 0
        self.writer: LogWriter | None = None
        self.first_token_sent = False
        # For the lifecycle lines (broker.structured_logs.step), none of which costs a Redis
        # call: the fields all of them carry, then the figures of the finished line.
        self.about: dict[str, Any] = {}
        self.first_token_at: float | None = None
        self.ttft_ms: int | None = None
        self.tokens = 0
        #: The terminal event this attempt appended, once it is in the log.
        self.terminal: Event | None = None

    async def run(self) -> str:
        try:
            claim = await self.log.claim(
                self.stream_id,
                worker=self.runtime.worker_id,
                lease_seconds=self.settings.lease_seconds,
            )
            state = await self.log.get(self.stream_id)
        except (GenerationNotFound, GenerationEnded, ClaimRefused) as exc:
            logger.info(
                "generation %s not run: %s",
                self.stream_id,
                exc,
                extra={"stream_id": self.stream_id},
            )
            return "skipped"
        except StoreUnavailable as exc:
            # No event was written: run the job again shortly (arq keeps it, up to its
            # max_tries), rather than fail it and leave the generation queued for good. A
            # claim that did land is simply claimed again (the attempt goes up).
            logger.warning(
                "generation %s: Redis unreachable at claim, retrying: %s", self.stream_id, exc
            )
            raise Retry(defer=CLAIM_RETRY_SECONDS) from exc
        self.origin_ms = state.created_at_ms
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
        self.writer = self.log.writer(
            self.stream_id, claim, lease_seconds=self.settings.lease_seconds
        )
        try:
            if claim.last_seq > 0:
                # An earlier attempt wrote events and died. Generating again could contradict
                # text that readers already saw, so end the stream: as the client asked, if
                # it asked to cancel; else with an error that lets it retry.
                if claim.cancel_requested:
                    await self._append(events.done("cancelled", events.NO_USAGE, t=self._t()))
                    return "cancelled"
                await self._append(
                    self._error(
                        "worker_lost",
                        "the worker running this generation stopped; retry the request",
                        retryable=True,
                    )
                )
                return "worker_lost"
            await self._append(events.metadata(state, attempt=claim.attempt, t=self._t()))
            if claim.cancel_requested:
                await self._append(events.done("cancelled", events.NO_USAGE, t=self._t()))
                return "cancelled"
            return await self._generate(state)
        except (StaleWriter, GenerationEnded) as exc:
            # Another attempt owns the generation, or it already ended: theirs to finish.
            logger.warning(
                "generation %s: stopped writing: %s",
                self.stream_id,
                exc,
                extra={"stream_id": self.stream_id, "attempt": claim.attempt},
            )
            return "fenced"
        except GenerationNotFound:
            logger.info(
                "generation %s expired or was deleted while running",
                self.stream_id,
                extra={"stream_id": self.stream_id},
            )
            return "gone"
        except asyncio.CancelledError:
            # arq's job timeout or a worker shutdown: end the stream so no reader waits forever.
            await asyncio.shield(
                self._end_quietly(
                    self._error(
                        "worker_stopped",
                        "the worker stopped before the generation finished; retry the request",
                        retryable=True,
                    )
                )
            )
            raise
        except SequenceConflict as conflict:
            if conflict.actual_last >= conflict.expected - 1:
                return await self._fail_internally()  # not a loss
            # The log is shorter than what this writer appended: Redis lost its last writes
            # (a crash before they reached disk). Readers may hold text the log no longer
            # has, so say so and end; the api answers their resumes with ``log_lost``.
            first_lost = conflict.actual_last + 1
            logger.error(
                "generation %s: Redis lost events %d-%d after they were appended",
                self.stream_id,
                first_lost,
                conflict.expected - 1,
                extra={"stream_id": self.stream_id},
            )
            structured_logs.step(
                "log_lost",
                self.stream_id,
                level=logging.ERROR,
                **self.about,
                lost_from_seq=first_lost,
                lost_to_seq=conflict.expected - 1,
            )
            with contextlib.suppress(Exception):
                await self.log.mark_lost(self.stream_id, first_lost)
            await self._end_quietly(
                self._error(
                    "log_lost",
                    "the store lost part of this answer after it was sent (a Redis crash); "
                    "retry the request",
                    retryable=True,
                )
            )
            return "log_lost"
        except StoreUnavailable as exc:
            # Redis was away for longer than the lease (the writer retried until then).
            logger.error(
                "generation %s: Redis unreachable for longer than the lease: %s",
                self.stream_id,
                exc,
                extra={"stream_id": self.stream_id},
            )
            await self._end_quietly(
                self._error(
                    "store_unavailable",
                    "the store was unreachable for longer than the worker's lease "
                    f"({self.settings.lease_seconds:g} s); retry the request",
                    retryable=True,
                )
            )
            return "store_unavailable"
        except Exception:
            return await self._fail_internally()
        finally:
            metrics.GENERATION_DURATION.observe(time.monotonic() - claimed_at)
            self._log_finished(claimed_at)

    def _log_finished(self, claimed_at: float) -> None:
        """The ``finished`` line, when this attempt's terminal event is the one in the log
        (a fenced attempt leaves it to whoever ended the generation)."""
        if self.terminal is None:
            return
        ended_at = time.monotonic()
        data = self.terminal.data
        status = final_status(self.terminal)
        usage = data.get("usage") if self.terminal.type is EventType.DONE else None
        tokens = (usage or {}).get("completion_tokens") or self.tokens
        rate = None
        if tokens and self.first_token_at is not None and ended_at > self.first_token_at:
            rate = round(tokens / (ended_at - self.first_token_at), 1)
        structured_logs.step(
            "finished",
            self.stream_id,
            level=logging.WARNING if status is Status.FAILED else logging.INFO,
            **self.about,
            status=status.value if status is not None else None,
            finish_reason=data.get("finish_reason"),
            error=data.get("code") if self.terminal.type is EventType.ERROR else None,
            duration_ms=round((ended_at - claimed_at) * 1000),
            ttft_ms=self.ttft_ms,
            tokens=tokens,
            tokens_per_second=rate,
            events=self.writer.next_seq - 1 if self.writer is not None else None,
        )

    async def _fail_internally(self) -> str:
        logger.exception(
            "generation %s: unexpected failure", self.stream_id, extra={"stream_id": self.stream_id}
        )
        await self._end_quietly(
            self._error(
                "internal_error",
                "the broker failed while generating; retry the request",
                retryable=True,
            )
        )
        return "internal_error"

    async def _generate(self, state: GenerationState) -> str:
        request = GenerationRequest.from_dict(state.request)
        provider = self.runtime.providers.for_model(request.model)
        if provider is None:
            await self._append(
                self._error(
                    "unroutable_model",
                    f"no provider serves model {request.model!r}",
                    retryable=False,
                )
            )
            return "unroutable_model"
        queue: asyncio.Queue[Chunk | _End] = asyncio.Queue(_QUEUE_SIZE)
        producer = asyncio.create_task(_pump(provider, request, queue))
        try:
            return await self._consume(queue, request)
        finally:
            producer.cancel()
            try:
                await producer
            except asyncio.CancelledError:
                # The producer's own cancellation is expected; the job's is not ours to eat.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    async def _consume(self, queue: asyncio.Queue[Chunk | _End], request: GenerationRequest) -> str:
        s = self.settings
        batcher = TokenBatcher(max_age=s.batch_max_age_ms / 1000, max_tokens=s.batch_max_tokens)
        estimated = request.max_tokens
        if estimated is None and request.fake is not None:
            estimated = s.default_max_tokens
        progress = ProgressTracker(
            interval=s.progress_interval_ms / 1000, estimated_total=estimated
        )
        finish_reason, usage = "stop", None
        renew_every = s.renew_interval_seconds
        next_renewal = time.monotonic() + renew_every
        end: _End | None = None
        while end is None:
            wake = min(d for d in (batcher.deadline(), next_renewal) if d is not None)
            try:
                item = await asyncio.wait_for(queue.get(), max(0.0, wake - time.monotonic()))
            except TimeoutError:
                item = None
            now = time.monotonic()
            if isinstance(item, _End):
                end = item
            elif isinstance(item, TextDelta):
                batcher.add(item.text)
            elif isinstance(item, ToolCallDelta):
                await self._flush(batcher, progress, now)
                await self._append(self._tool_call(item))
            elif isinstance(item, Finish):
                finish_reason = item.reason
            elif isinstance(item, Usage):
                usage = item
            if batcher.due(now):
                await self._flush(batcher, progress, now)
            assert self.writer is not None
            if now >= next_renewal:
                # Renews the lease, learns of a cancel, and raises StaleWriter once another
                # attempt owns the generation.
                next_renewal = now + renew_every
                await self.writer.renew()
            if self.writer.cancel_requested:
                await self._flush(batcher, progress, now, final=True)
                await self._append(
                    events.done("cancelled", self._usage(usage, progress), t=self._t())
                )
                return "cancelled"
        await self._flush(batcher, progress, time.monotonic(), final=True)
        if end.error is not None:
            error = end.error
            if isinstance(error, ProviderError):
                await self._append(
                    self._error(
                        error.code,
                        error.message,
                        retryable=error.retryable,
                        retry_after=error.retry_after,
                    )
                )
                return "failed"
            raise error
        await self._append(events.done(finish_reason, self._usage(usage, progress), t=self._t()))
        return "completed"

    async def _flush(
        self, batcher: TokenBatcher, progress: ProgressTracker, now: float, *, final: bool = False
    ) -> None:
        events = []
        if batcher.pending:
            text, count = batcher.take(now)
            progress.record(count, now)
            events.append(self._event(EventType.TOKEN, {"text": text, "tokens": count}))
            self.tokens += count
            if not self.first_token_sent:
                self.first_token_sent = True
                self.first_token_at = now
                self.ttft_ms = max(0, now_ms() - self.origin_ms)
                metrics.TIME_TO_FIRST_TOKEN.observe(self.ttft_ms / 1000)
                structured_logs.step(
                    "first_token", self.stream_id, **self.about, ttft_ms=self.ttft_ms
                )
        if progress.due(now) or (final and progress.unreported):
            events.append(self._event(EventType.PROGRESS, progress.report(now)))
        await self._append(*events)

    async def _append(self, *events: Event) -> None:
        assert self.writer is not None
        await self.writer.append(*events)
        if events and events[-1].terminal:
            self.terminal = events[-1]

    async def _end_quietly(self, event: Event) -> None:
        """Best effort terminal event on the way out; the log refuses it if one exists.

        After a lost append reply the log may be ahead of this writer with its own events;
        the writer then resynchronises once, so the stream still gets its terminal event.
        """
        assert self.writer is not None
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
                self.stream_id,
                exc,
                extra={"stream_id": self.stream_id},
            )
        else:
            self.terminal = event

    def _t(self) -> int:
        """Milliseconds since the generation was created: the ``t`` of every event."""
        return now_ms() - self.origin_ms

    def _event(self, kind: EventType, data: dict[str, Any]) -> Event:
        return Event(kind, data, t=self._t())

    def _error(
        self, code: str, message: str, *, retryable: bool, retry_after: float | None = None
    ) -> Event:
        return events.error(
            code, message, retryable=retryable, t=self._t(), retry_after=retry_after
        )

    def _tool_call(self, delta: ToolCallDelta) -> Event:
        return self._event(
            EventType.TOOL_CALL,
            {
                "index": delta.index,
                "id": delta.id,
                "name": delta.name,
                "arguments": delta.arguments,
            },
        )

    @staticmethod
    def _usage(usage: Usage | None, progress: ProgressTracker) -> dict[str, int]:
        """Usage as the provider reported it; else the streamed token count, no prompt count."""
        if usage is not None:
            return {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            }
        tokens = progress.tokens
        return {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}


async def _pump(
    provider: Provider, request: GenerationRequest, queue: asyncio.Queue[Chunk | _End]
) -> None:
    """Read the provider into the queue; cancelling this task closes the provider stream."""
    try:
        async with contextlib.aclosing(provider.stream(request)) as chunks:
            async for chunk in chunks:
                await queue.put(chunk)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await queue.put(_End(exc))
        return
    await queue.put(_End())
