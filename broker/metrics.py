"""Prometheus metrics of the api and the workers, with ``prometheus-client``.

Every name starts with ``streambroker_``. The api serves them at ``GET /metrics``. An api run
with ``--workers N`` shares them between its processes through prometheus-client's
multiprocess mode (``streambroker api`` sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh temporary
directory when N > 1, unless it is set already). A worker process serves its own at
``GET /metrics`` of its health endpoint (``workers.health``, on ``BROKER_METRICS_PORT``: off
by default, so several workers on one machine do not collide); ``streambroker dev`` runs both
in one process, so its ``/metrics`` shows everything.

Counting is kept off the per-event path where it can be: events sent are counted per write
(with the number of events it carried), and hub lag is observed once per wake slice; the
worker's figures are counted once per job, renewal, take-over or failure. The queue's figures
are not counted at all: a worker reads them from Redis when it is scraped (``QUEUE``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Seconds: first tokens and pickups are tens of ms; a slow upstream is seconds.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

# -- api -----------------------------------------------------------------------------------

EVENT_CONNECTIONS = Gauge(
    "streambroker_event_connections",
    "Open event (SSE) connections.",
    multiprocess_mode="livesum",
)
EVENTS_SENT = Counter("streambroker_events_sent", "Events written to SSE clients.")
EVENTS_WRITTEN_LIVE = Counter(
    "streambroker_events_written_live",
    "Of streambroker_events_sent, those the reader hub wrote straight to a client's "
    "connection while the client waited at the live tail (no task woken).",
)
RESUMES = Counter("streambroker_resumes", "Event connections that came back with a resume point.")
STREAMS_CREATED = Counter("streambroker_streams_created", "Generations created.")
HUB_LAG = Histogram(
    "streambroker_hub_lag_seconds",
    "How long a subscriber with new events waited to be woken (the reader hub's backlog).",
    buckets=_LATENCY_BUCKETS,
)

# -- workers -------------------------------------------------------------------------------

STREAMS_FINISHED = Counter(
    "streambroker_streams_finished",
    "Generations that ended, by status (completed, failed, cancelled).",
    ["status"],
)
TOKENS_GENERATED = Counter("streambroker_tokens_generated", "Tokens appended to logs.")
APPEND_REPLICA_SHORTFALLS = Counter(
    "streambroker_append_replica_shortfalls",
    "Appends that fewer replicas than BROKER_APPEND_WAIT_REPLICAS acknowledged in time.",
)
TIME_TO_FIRST_TOKEN = Histogram(
    "streambroker_time_to_first_token_seconds",
    "From a generation's creation to its first token in the log.",
    buckets=_LATENCY_BUCKETS,
)
GENERATION_DURATION = Histogram(
    "streambroker_generation_duration_seconds",
    "From a worker's claim to the terminal event.",
    buckets=_DURATION_BUCKETS,
)
JOB_PICKUP = Histogram(
    "streambroker_job_pickup_seconds",
    "From a generation's creation (a continuation's: its hand-over) to a worker claiming it.",
    buckets=_LATENCY_BUCKETS,
)


JOBS_IN_FLIGHT = Gauge(
    "streambroker_jobs_in_flight",
    "Generation jobs this worker process is running now.",
    multiprocess_mode="livesum",
)
#: The classes ``streambroker_provider_errors_total`` counts, all present from the start.
PROVIDER_ERROR_KINDS = (
    "timeout",
    "rate_limited",
    "server_error",
    "bad_request",
    "connection",
    "other",
)
PROVIDER_ERRORS = Counter(
    "streambroker_provider_errors",
    "Generations ended by an error of their model's upstream, by kind (timeout, "
    "rate_limited, server_error, bad_request, connection, other).",
    ["kind"],
)
LEASE_RENEWALS = Counter(
    "streambroker_lease_renewals",
    "Leases a worker renewed on the generations it writes (while its model is slow to answer).",
)
#: How a sweeper ended a generation it took over (``broker.sweeper``).
TAKEOVER_OUTCOMES = ("worker_lost", "queue_timeout", "log_lost", "cancelled")
LEASE_TAKEOVERS = Counter(
    "streambroker_lease_takeovers",
    "Generations a sweeper took over from a lapsed lease and ended, by how it ended them "
    "(worker_lost, queue_timeout, log_lost, cancelled).",
    ["outcome"],
)
WORKERS_LOST = Counter(
    "streambroker_workers_lost",
    "Generations ended with worker_lost: their worker died or stalled past its lease.",
)
HANDOVERS = Counter(
    "streambroker_handovers",
    "Generations whose writer was lost (a sweeper found its lease lapsed) or stopped (a "
    "worker shutting down), by reason (worker_lost, worker_stopped) and outcome: queued (a "
    "continuation was queued), ended (the route does not continue, or the continuation "
    "limit was reached), cancelled (a cancel was asked for).",
    ["reason", "outcome"],
)
CONTINUATIONS = Counter(
    "streambroker_continuations",
    "Continuations a worker started (a resumed event written), by the reason the attempt "
    "before it stopped (worker_lost, worker_stopped).",
    ["reason"],
)
CONTINUATION_SEAM = Histogram(
    "streambroker_continuation_seam_seconds",
    "A continued generation's gap at the seam: from the last event of the attempt that "
    "stopped to the first tokens of the one that continued it.",
    buckets=_LATENCY_BUCKETS,
)
ARCHIVED = Counter(
    "streambroker_archived",
    "Archive steps done (BROKER_ARCHIVE_URL), by step: copied (a finished generation's copy "
    "committed in PostgreSQL), dropped (its Redis keys deleted after "
    "BROKER_ARCHIVE_AFTER_SECONDS), expired (deleted from the archive by its retention).",
    ["step"],
)
ARCHIVE_FAILURES = Counter(
    "streambroker_archive_failures",
    "Archive steps that failed (PostgreSQL or Redis away); the generation stays in Redis and "
    "is tried again a minute later.",
)
ARCHIVE_LAG = Gauge(
    "streambroker_archive_lag_seconds",
    "How long ago the oldest finished generation without an archive copy yet ended (0: "
    "none waiting), as the last archive pass saw it.",
)
STORE_ERRORS = Counter(
    "streambroker_store_errors",
    "Redis commands that failed because Redis was unreachable, timed out, failing over or "
    "refusing writes (what callers see as store_unavailable), by process (api, worker, dev).",
    ["process"],
)

for _kind in PROVIDER_ERROR_KINDS:
    PROVIDER_ERRORS.labels(_kind)
for _outcome in TAKEOVER_OUTCOMES:
    LEASE_TAKEOVERS.labels(_outcome)
for _reason in ("worker_lost", "worker_stopped"):
    CONTINUATIONS.labels(_reason)
    for _outcome in ("queued", "ended", "cancelled"):
        HANDOVERS.labels(_reason, _outcome)
for _step in ("copied", "dropped", "expired"):
    ARCHIVED.labels(_step)

#: What this process is, for ``streambroker_store_errors_total{process}``.
_process_role = "unknown"


def set_process_role(role: str) -> None:
    """Name this process's kind (``api``, ``worker``, ``dev``) in the store error count."""
    global _process_role
    _process_role = role
    STORE_ERRORS.labels(role)  # present, at 0, before the first failure


def count_store_error() -> None:
    STORE_ERRORS.labels(_process_role).inc()


#: Codes of ``workers.providers`` errors whose kind is not ``other``; an in-stream
#: ``upstream_error`` the upstream calls its own fault (retryable) is a ``server_error``.
_PROVIDER_KINDS = {
    "upstream_timeout": "timeout",
    "upstream_rate_limited": "rate_limited",
    "upstream_unavailable": "server_error",
    "upstream_bad_request": "bad_request",
    "upstream_connection": "connection",
}


def provider_error_kind(code: str, *, retryable: bool) -> str:
    """The kind a provider's error code is counted under (``PROVIDER_ERROR_KINDS``)."""
    if code == "upstream_error" and retryable:
        return "server_error"
    return _PROVIDER_KINDS.get(code, "other")


def count_provider_error(code: str, *, retryable: bool) -> None:
    PROVIDER_ERRORS.labels(provider_error_kind(code, retryable=retryable)).inc()


class QueueFigures(Collector):
    """``streambroker_queue_depth`` and ``streambroker_queue_oldest_age_seconds``: figures of
    the shared job queue, set by whoever read them from Redis last (a worker, when it is
    scraped: ``workers.health``). Absent until read, and while they cannot be: a stale
    figure would look like a healthy queue."""

    def __init__(self) -> None:
        self.depth: int | None = None
        self.oldest_age_seconds: float | None = None

    def set(self, depth: int, oldest_age_seconds: float) -> None:
        self.depth, self.oldest_age_seconds = depth, oldest_age_seconds

    def clear(self) -> None:
        self.depth = self.oldest_age_seconds = None

    _DEPTH = (
        "streambroker_queue_depth",
        "Generations waiting in the queue for a worker (due, and not running anywhere).",
    )
    _OLDEST = (
        "streambroker_queue_oldest_age_seconds",
        "How long the oldest generation waiting for a worker has waited (0: none waits).",
    )

    def describe(self) -> Iterator[Metric]:
        """The names, without values: the registry knows them before the first reading."""
        yield GaugeMetricFamily(*self._DEPTH)
        yield GaugeMetricFamily(*self._OLDEST)

    def collect(self) -> Iterator[Metric]:
        if self.depth is None or self.oldest_age_seconds is None:
            return
        yield GaugeMetricFamily(*self._DEPTH, value=self.depth)
        yield GaugeMetricFamily(*self._OLDEST, value=self.oldest_age_seconds)


QUEUE = QueueFigures()
REGISTRY.register(QUEUE)


def exposition() -> tuple[bytes, str]:
    """The metrics as Prometheus text, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(QUEUE)  # this process's own reading, not a shared count
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
