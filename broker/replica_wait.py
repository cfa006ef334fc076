"""Waiting for replicas after each append (Redis ``WAIT``): what a failover can lose, narrowed.

Redis replicates asynchronously. An append is acknowledged (and read by the hub, and sent to
clients) as soon as the master has it; a failover in the next moment promotes a replica that
may not, and the events readers hold are then on a lost timeline. The broker makes that loss
explicit in any case (``log_lost``, 410; see ``broker.scripts``' store epoch). ``WAIT`` right
after the append, on the same connection, narrows the window: the writer goes on only once
``replicas`` replicas have the batch, or ``timeout_ms`` passed.

A shortfall (fewer replicas in time, or a store that has no ``WAIT``) never fails the
generation: the batch is in the master and readers may already have it, so refusing it
would only turn a possible loss into a certain one. It is counted
(``streambroker_append_replica_shortfalls_total``) and logged, at most every
``WARN_EVERY_SECONDS``. Its cost is the time the wait adds to each batch: a replica round trip
while replicas keep up, ``timeout_ms`` per batch while they do not.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker import metrics

if TYPE_CHECKING:
    from broker.settings import GenerationSettings

logger = logging.getLogger("streambroker.writer")

#: Least time between two warnings about replicas falling short (one per batch would flood).
WARN_EVERY_SECONDS = 10.0


@dataclass(frozen=True)
class ReplicaWait:
    """How many replicas each append waits for (0: none, the default), and for how long."""

    replicas: int = 0
    timeout_ms: int = 50

    @property
    def enabled(self) -> bool:
        return self.replicas > 0

    @classmethod
    def from_settings(cls, settings: GenerationSettings) -> ReplicaWait:
        return cls(settings.append_wait_replicas, settings.append_wait_timeout_ms)


class ShortfallReport:
    """Counts and logs the appends whose ``WAIT`` fell short, without flooding the log."""

    def __init__(self, wait: ReplicaWait) -> None:
        self.wait = wait
        self._warned_at = -WARN_EVERY_SECONDS

    def note(self, stream_id: str, acknowledged: int | Exception) -> None:
        """Record the answer of one append's ``WAIT``: a replica count, or its error."""
        if isinstance(acknowledged, int) and acknowledged >= self.wait.replicas:
            return
        metrics.APPEND_REPLICA_SHORTFALLS.inc()
        now = time.monotonic()
        if now - self._warned_at < WARN_EVERY_SECONDS:
            return
        self._warned_at = now
        got = (
            f"{acknowledged} of {self.wait.replicas} replicas acknowledged it"
            if isinstance(acknowledged, int)
            else f"WAIT failed: {acknowledged}"
        )
        logger.warning(
            "generation %s: an append went on without the replicas it waits for (%s, "
            "waiting up to %d ms); a failover now may lose it (readers would be told: "
            "log_lost). Counted in streambroker_append_replica_shortfalls_total",
            stream_id,
            got,
            self.wait.timeout_ms,
            extra={"stream_id": stream_id},
        )
