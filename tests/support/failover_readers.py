"""Readers that watch generations through store failovers and say how each one ended.

A reader is what a chat client does on a flaky network: it reads a generation's events,
drops the connection now and then, and comes back with ``Last-Event-ID`` to whichever
front-end the load balancer picks. Across a Redis failover the broker promises that every
reader ends in one of two ways:

- ``completed``: the exact text the fake model makes for the request, and one ``done``;
- ``explicit``: it was told, with an ``error`` event (``log_lost``, ``worker_lost``…) or a
  ``410`` on a resume.

Anything else is ``silent``: a ``done`` over a text that differs from the model's, a ``204``
(the broker saying the reader holds the whole stream, when it never received its terminal
event: a reader stops at its terminal event, so it never resumes past one), another
unexpected status, a malformed event, or a reader left waiting with no signal until its
deadline (``timeout``). The failover tests and ``infra/bench/failover.py`` count these.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import httpx

Outcome = Literal["completed", "explicit", "silent"]
Verdict = tuple[Outcome, str]

#: Statuses a reader keeps trying through (the store or a front-end is failing over).
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Pause before reconnecting after a connection the reader did not cut itself ended.
_RETRY_PAUSE = 0.1


@dataclass
class ReaderResult:
    """How one reader's watch of one generation ended."""

    stream_id: str
    outcome: Outcome
    #: What decided it: ``done``, ``error:<code>``, ``http:410``, ``timeout``, ``204``…
    reason: str
    text: str
    connections: int
    #: Events received with an id at or below one already received (must stay 0: after a
    #: resume the broker sends only what follows ``Last-Event-ID``, once, in order).
    repeated: int = 0
    #: Retryable statuses answered on the way (``503`` while the store fails over…).
    statuses: Counter[int] = field(default_factory=Counter)


@dataclass
class _Progress:
    text: list[str] = field(default_factory=list)
    last_id: int | None = None
    tokens: int = 0
    repeated: int = 0
    connections: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    #: Set the moment an event or status decides the outcome. Kept here, not only returned:
    #: a cut can land while the decided connection is being closed, and the reader must not
    #: then resume past the terminal event it already holds (that resume is a 204).
    verdict: Verdict | None = None


class FailoverReader:
    """Watches one generation through cuts and failovers until it ends or ``deadline``.

    ``seat``: which of a generation's readers this is. It picks the reader's own cut times
    (two readers of one stream must not cut in step) and the front-end it connects to first
    (``bases`` are then taken in turn).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        bases: list[str],
        stream_id: str,
        expected_text: str,
        *,
        seat: int = 0,
        cut_after: tuple[float, float] = (0.3, 1.5),
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._bases = bases
        self._next_base = seat % len(bases)
        self.stream_id = stream_id
        self.expected_text = expected_text
        self._cut_after = cut_after
        self._rng = rng or random.Random(f"{stream_id}/{seat}")
        self.progress = _Progress()

    @property
    def tokens(self) -> int:
        """The model's tokens received so far (each ``token`` event says how many it holds)."""
        return self.progress.tokens

    async def run(self, deadline: float) -> ReaderResult:
        """Read, cut and resume until the stream ends for this reader, or ``deadline``
        (``time.monotonic()``) passes: then it is a silent ``timeout``."""
        progress = self.progress
        while time.monotonic() < deadline:
            progress.connections += 1
            base = self._bases[self._next_base]
            self._next_base = (self._next_base + 1) % len(self._bases)
            cut_in = min(self._rng.uniform(*self._cut_after), deadline - time.monotonic())
            cut = False
            try:
                await asyncio.wait_for(self._connect(base, progress), max(cut_in, 0))
            except TimeoutError:
                cut = True  # on purpose: resume from the last id at once
            except httpx.TransportError:
                pass  # a front-end refused or dropped us: resume in a moment
            if progress.verdict is not None:
                return self._result(*progress.verdict)
            if not cut:
                await asyncio.sleep(_RETRY_PAUSE)
        return self._result("silent", "timeout")

    async def _connect(self, base: str, progress: _Progress) -> None:
        """One connection; ``progress.verdict`` is set when it decided the outcome (it is
        left None by a retryable status, or a response ended before the stream's end)."""
        last = progress.last_id
        headers = {"Last-Event-ID": str(last)} if last is not None else {}
        url = f"{base}/v1/streams/{self.stream_id}/events"
        async with self._client.stream("GET", url, headers=headers) as response:
            status = response.status_code
            if status in _RETRY_STATUSES:
                progress.statuses[status] += 1
            elif status == 410:
                progress.verdict = "explicit", "http:410"
            elif status == 204:
                progress.verdict = "silent", "204"  # see the module's doc
            elif status != 200:
                progress.verdict = "silent", f"http:{status}"
            else:
                progress.verdict = await self._read_events(response, progress)

    async def _read_events(self, response: httpx.Response, progress: _Progress) -> Verdict | None:
        event_type, data, event_id = "message", "", None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event_type = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
            elif line.startswith("id:"):
                event_id = line[3:].strip()
            elif line == "":
                if data:
                    verdict = self._take(progress, event_type, data, event_id)
                    if verdict is not None:
                        return verdict
                event_type, data, event_id = "message", "", None
        return None  # the server ended the response: resume

    def _take(
        self, progress: _Progress, event_type: str, data: str, event_id: str | None
    ) -> Verdict | None:
        try:
            payload = json.loads(data)
            seq = int(event_id) if event_id is not None else None
        except ValueError:
            return "silent", f"malformed:{event_type}"
        if seq is not None:
            if progress.last_id is not None and seq <= progress.last_id:
                progress.repeated += 1
            progress.last_id = max(seq, progress.last_id or 0)
        if event_type == "token":
            progress.text.append(payload["text"])
            progress.tokens += int(payload.get("tokens", 1))
        elif event_type == "done":
            complete = "".join(progress.text) == self.expected_text
            return ("completed", "done") if complete else ("silent", "done:text differs")
        elif event_type == "error":
            return "explicit", f"error:{payload.get('code')}"
        return None

    def _result(self, outcome: Outcome, reason: str) -> ReaderResult:
        progress = self.progress
        return ReaderResult(
            self.stream_id,
            outcome,
            reason,
            "".join(progress.text),
            progress.connections,
            progress.repeated,
            progress.statuses,
        )


def tally(results: list[ReaderResult]) -> Counter[str]:
    """Outcomes counted, with the reasons of the explicit and silent ones."""
    counts: Counter[str] = Counter(r.outcome for r in results)
    for r in results:
        if r.outcome != "completed":
            counts[f"{r.outcome}:{r.reason}"] += 1
    return counts
