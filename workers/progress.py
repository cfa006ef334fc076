"""Progress figures for ``progress`` events: tokens so far, rate, estimated total and ETA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ProgressTracker:
    interval: float
    #: ``max_tokens`` when the request set it: the most the answer can be, so an upper bound.
    estimated_total: int | None
    tokens: int = 0
    #: Tokens earlier attempts wrote (a continuation counts on from them; its rate is its own).
    earlier: int = 0
    _first_token_at: float | None = None
    _last_reported_tokens: int = 0
    _next_report: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = max(self.tokens, self.earlier)
        self._last_reported_tokens = self.tokens

    def record(self, tokens: int, now: float) -> None:
        if self._first_token_at is None:
            self._first_token_at = now
            self._next_report = now + self.interval
        self.tokens += tokens

    def due(self, now: float) -> bool:
        """A report is due once per interval, and only when tokens came since the last one."""
        return (
            self._first_token_at is not None
            and now >= self._next_report
            and self.tokens > self._last_reported_tokens
        )

    @property
    def unreported(self) -> bool:
        """Tokens came since the last report (the final report must include them)."""
        return self.tokens > self._last_reported_tokens

    def report(self, now: float) -> dict[str, Any]:
        self._last_reported_tokens = self.tokens
        self._next_report = now + self.interval
        return self.snapshot(now)

    def snapshot(self, now: float) -> dict[str, Any]:
        rate = self.rate(now)
        total = self.estimated_total
        if total is not None:
            total = max(total, self.tokens)
        percent = round(100.0 * self.tokens / total, 1) if total else None
        eta_ms = None
        if total is not None and rate > 0:
            eta_ms = round(1000 * (total - self.tokens) / rate)
        return {
            "tokens": self.tokens,
            "tokens_per_second": round(rate, 2),
            "estimated_total": total,
            "percent": percent,
            "eta_ms": eta_ms,
        }

    def rate(self, now: float) -> float:
        """Tokens per second since this attempt's first token (which starts the clock)."""
        made = self.tokens - self.earlier
        if self._first_token_at is None or made <= 1:
            return 0.0
        elapsed = now - self._first_token_at
        return (made - 1) / elapsed if elapsed > 0 else 0.0
