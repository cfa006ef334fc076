"""Reconnect delays: exponential, capped, with jitter, so that thousands of clients cut off
together (a deploy, a load balancer restart) do not come back together."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    #: First delay when the server has not said (its ``retry:`` field, once received, is the
    #: first delay instead: the operator's choice wins).
    initial: float = 0.25
    maximum: float = 10.0
    multiplier: float = 2.0
    #: Stop retrying (``ConnectionFailed``) after this long without a successful connection;
    #: ``None`` retries for ever.
    give_up_after: float | None = 300.0
    #: Stop sooner while the broker has not answered once (a ``watch`` whose first
    #: connection never got its stream: a wrong URL, a broker that is down): after this
    #: long, counted from the start. ``None``: ``give_up_after`` applies from the start too.
    give_up_unanswered_after: float | None = None

    def delay(self, failures: int, base: float | None = None) -> float:
        """The wait before reconnect number ``failures`` (1 for the first), "equal jitter":
        somewhere in the upper half of the exponential delay, never a burst of zeros."""
        ceiling = min(self.maximum, (base or self.initial) * self.multiplier ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)
