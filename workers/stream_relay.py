"""Relaying a provider's answer into the log: batched tokens, tool calls, progress, one end.

The provider is read by a separate task into a bounded queue, so the loop that appends can
act on time — flush a batch whose window closed, report progress, renew the lease and so
learn of a cancel — even while the provider is silent. Cancelling that task closes the
provider's stream (``aclosing``), which closes the upstream request.

The relay ends the stream itself when the provider finishes (``done``), fails with a
``ProviderError`` (its ``error``) or the client cancels (``done``/``cancelled``); anything
else the provider raises goes up to the job, which decides how the attempt ends. Told to
``hand_over`` (its worker is stopping), it appends what it holds and returns without an end:
the job hands the generation over to another worker, which continues it (``Resume``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from broker import events, metrics, structured_logs
from broker.events import Event, EventType
from broker.request import GenerationRequest
from broker.settings import GenerationSettings
from broker.state import now_ms
from workers.attempt_output import AttemptOutput
from workers.batching import TokenBatcher
from workers.progress import ProgressTracker
from workers.providers.base import (
    Chunk,
    Finish,
    Provider,
    ProviderError,
    Resume,
    TextDelta,
    ToolCallDelta,
    Usage,
)

#: Chunks the provider may run ahead of the appends before it waits (backpressure).
_QUEUE_SIZE = 1024


class _End:
    """Queue marker: the provider finished (``error`` set when it failed)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class _Wake:
    """Queue marker: look at the relay's own state now (``hand_over`` was called)."""


@dataclass
class TokenFigures:
    """The tokens an attempt appended, as its ``finished`` line reports them."""

    count: int = 0
    #: When the first batch of tokens was appended (monotonic).
    first_at: float | None = None
    #: From the create to the first token, in milliseconds.
    ttft_ms: int | None = None


class StreamRelay:
    """Appends one provider's answer to one request through one attempt's output."""

    def __init__(
        self,
        output: AttemptOutput,
        settings: GenerationSettings,
        request: GenerationRequest,
        *,
        figures: TokenFigures,
        about: dict[str, Any],
        resume: Resume | None = None,
        seam_from_t: int | None = None,
    ) -> None:
        self._output = output
        self._request = request
        #: A continuation: what earlier attempts wrote (the provider makes what follows).
        self._resume = resume
        #: A continuation: the ``t`` of the last event before the seam, from which the seam's
        #: delay is measured to this attempt's first token.
        self._seam_from_t = seam_from_t
        self._handing_over = False
        self._queue: asyncio.Queue[Chunk | _End | _Wake] = asyncio.Queue(_QUEUE_SIZE)
        #: Filled in as tokens are appended; the job reads it even when the relay fails.
        self._figures = figures
        #: The fields of every lifecycle line (``first_token`` is written here).
        self._about = about
        self._batcher = TokenBatcher(
            max_age=settings.batch_max_age_ms / 1000, max_tokens=settings.batch_max_tokens
        )
        estimated = request.max_tokens
        if estimated is None and request.fake is not None:
            estimated = settings.default_max_tokens
        self._progress = ProgressTracker(
            interval=settings.progress_interval_ms / 1000,
            estimated_total=estimated,
            earlier=resume.tokens if resume is not None else 0,
        )
        self._finish_reason = "stop"
        self._usage: Usage | None = None
        self._renew_every = settings.renew_interval_seconds
        self._next_renewal = time.monotonic() + self._renew_every

    def usage(self) -> dict[str, int]:
        """The answer's usage so far (the provider's, else the tokens streamed)."""
        return self._usage_figures()

    def hand_over(self) -> None:
        """Stop relaying soon: the tokens already taken are appended, then ``run`` returns
        ``handed_over`` without an end (its worker is stopping; another one continues)."""
        self._handing_over = True
        # Wakes a consumer waiting on a silent provider; a full queue means it is not waiting.
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_Wake())

    async def run(self, provider: Provider) -> str:
        """Relay ``provider``'s answer until it ends; returns how: ``completed``, ``failed``
        (a ``ProviderError``, appended as the stream's error), ``cancelled``, or
        ``handed_over`` (told to ``hand_over``: no end was appended)."""
        queue = self._queue
        producer = asyncio.create_task(_pump(provider, self._request, self._resume, queue))
        try:
            return await self._consume(queue)
        finally:
            producer.cancel()
            try:
                await producer
            except asyncio.CancelledError:
                # The producer's own cancellation is expected; the job's is not ours to eat.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise

    async def _consume(self, queue: asyncio.Queue[Chunk | _End | _Wake]) -> str:
        end: _End | None = None
        while end is None:
            item = await self._next(queue)
            now = time.monotonic()
            end = await self._take(item, now)
            if self._handing_over and end is None:
                await self._flush(now, final=True)
                return "handed_over"
            if self._batcher.due(now):
                await self._flush(now)
            await self._renew_if_due(now)
            if self._output.writer.cancel_requested:
                return await self._end_cancelled(now)
        return await self._end(end)

    async def _next(
        self, queue: asyncio.Queue[Chunk | _End | _Wake]
    ) -> Chunk | _End | _Wake | None:
        """The provider's next item; None when a batch or the lease renewal is due first."""
        wake = min(d for d in (self._batcher.deadline(), self._next_renewal) if d is not None)
        try:
            return await asyncio.wait_for(queue.get(), max(0.0, wake - time.monotonic()))
        except TimeoutError:
            return None

    async def _take(self, item: Chunk | _End | _Wake | None, now: float) -> _End | None:
        """Take one item in; returns the end marker when the provider is done."""
        if isinstance(item, _End):
            return item
        if isinstance(item, TextDelta):
            self._batcher.add(item.text)
        elif isinstance(item, ToolCallDelta):
            # The tokens before a tool call go out first, so the log keeps their order.
            await self._flush(now)
            await self._output.append(self._tool_call(item))
        elif isinstance(item, Finish):
            self._finish_reason = item.reason
        elif isinstance(item, Usage):
            self._usage = item
        return None

    async def _renew_if_due(self, now: float) -> None:
        if now >= self._next_renewal:
            # Renews the lease, learns of a cancel, and raises StaleWriter once another
            # attempt owns the generation.
            self._next_renewal = now + self._renew_every
            await self._output.writer.renew()

    async def _end_cancelled(self, now: float) -> str:
        await self._flush(now, final=True)
        output = self._output
        await output.append(events.done("cancelled", self._usage_figures(), t=output.t()))
        return "cancelled"

    async def _end(self, end: _End) -> str:
        output = self._output
        await self._flush(time.monotonic(), final=True)
        if end.error is None:
            usage = self._usage_figures()
            await output.append(events.done(self._finish_reason, usage, t=output.t()))
            return "completed"
        error = end.error
        if not isinstance(error, ProviderError):
            raise error
        await output.append(
            output.error(
                error.code, error.message, retryable=error.retryable, retry_after=error.retry_after
            )
        )
        return "failed"

    async def _flush(self, now: float, *, final: bool = False) -> None:
        """Append the pending tokens, and a progress report when one is due (or, at the end,
        when tokens came since the last one)."""
        batch: list[Event] = []
        if self._batcher.pending:
            text, count = self._batcher.take(now)
            self._progress.record(count, now)
            batch.append(self._output.event(EventType.TOKEN, {"text": text, "tokens": count}))
            self._count_tokens(count, now)
        if self._progress.due(now) or (final and self._progress.unreported):
            batch.append(self._output.event(EventType.PROGRESS, self._progress.report(now)))
        await self._output.append(*batch)

    def _count_tokens(self, count: int, now: float) -> None:
        figures = self._figures
        figures.count += count
        if figures.first_at is not None:
            return
        figures.first_at = now
        if self._seam_from_t is not None:
            self._observe_seam()
            return
        # From the create to the moment the first batch is taken, just before its append.
        figures.ttft_ms = max(0, now_ms() - self._output.origin_ms)
        metrics.TIME_TO_FIRST_TOKEN.observe(figures.ttft_ms / 1000)
        structured_logs.step(
            "first_token", self._output.writer.stream_id, **self._about, ttft_ms=figures.ttft_ms
        )

    def _observe_seam(self) -> None:
        """A continuation's first tokens: how long readers waited at the seam, from the last
        event the stopped attempt wrote (the generation's first token was long ago)."""
        assert self._seam_from_t is not None
        seam_ms = max(0, self._output.t() - self._seam_from_t)
        metrics.CONTINUATION_SEAM.observe(seam_ms / 1000)
        structured_logs.step(
            "continued", self._output.writer.stream_id, **self._about, seam_ms=seam_ms
        )

    def _tool_call(self, delta: ToolCallDelta) -> Event:
        return self._output.event(
            EventType.TOOL_CALL,
            {
                "index": delta.index,
                "id": delta.id,
                "name": delta.name,
                "arguments": delta.arguments,
            },
        )

    def _usage_figures(self) -> dict[str, int]:
        """Usage as the provider reported it; else the streamed token count, no prompt count."""
        usage = self._usage
        if usage is not None:
            # A continuation's provider counts its own request; the answer's earlier tokens
            # were made by the attempts before it (whose own usage was never reported).
            earlier = self._progress.earlier
            return {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens + earlier,
                "total_tokens": usage.total_tokens + earlier,
            }
        tokens = self._progress.tokens
        return {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}


async def _pump(
    provider: Provider,
    request: GenerationRequest,
    resume: Resume | None,
    queue: asyncio.Queue[Chunk | _End | _Wake],
) -> None:
    """Read the provider into the queue; cancelling this task closes the provider stream."""
    try:
        # Only a continuation passes ``resume``: a provider that never continues need not take it.
        stream = provider.stream(request) if resume is None else provider.stream(request, resume)
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                await queue.put(chunk)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await queue.put(_End(exc))
        return
    await queue.put(_End())
