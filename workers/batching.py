"""Token batching: fewer, larger appends at high token rates; no added delay at low ones.

The rule is a window, not a fixed batch: at most one flush per ``max_age`` seconds, and a
token that arrives when the window since the last flush has already passed goes out at once.
So a slow model (a token every 100 ms) has each token appended the moment it arrives, while a
fast one (a thousand tokens/s) is appended every ``max_age`` in batches of whatever came — the
batch size follows the rate with no rate estimate to tune. ``max_tokens`` caps a batch, so one
event never grows without bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBatcher:
    max_age: float
    max_tokens: int
    _texts: list[str] = field(default_factory=list)
    _last_flush: float = float("-inf")

    @property
    def pending(self) -> int:
        return len(self._texts)

    def add(self, text: str) -> None:
        self._texts.append(text)

    def due(self, now: float) -> bool:
        """Whether the pending tokens should be appended now."""
        if not self._texts:
            return False
        return len(self._texts) >= self.max_tokens or now >= self._last_flush + self.max_age

    def deadline(self) -> float | None:
        """When the pending tokens become due (None when nothing is pending)."""
        return self._last_flush + self.max_age if self._texts else None

    def take(self, now: float) -> tuple[str, int]:
        """The pending text and its token count; starts a new window."""
        text, count = "".join(self._texts), len(self._texts)
        self._texts.clear()
        self._last_flush = now
        return text, count
