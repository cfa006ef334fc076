"""Prometheus metrics of the api and the workers, with ``prometheus-client``.

Every name starts with ``streambroker_``. The api serves them at ``GET /metrics``. An api run
with ``--workers N`` shares them between its processes through prometheus-client's
multiprocess mode (``streambroker api`` sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh temporary
directory when N > 1, unless it is set already). A worker process serves its own at
``BROKER_METRICS_PORT`` (off by default, so several workers on one machine do not collide);
``streambroker dev`` runs both in one process, so its ``/metrics`` shows everything.

Counting is kept off the per-event path where it can be: events sent are counted per write
(with the number of events it carried), and hub lag is observed once per wake slice.
"""

from __future__ import annotations

import os

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
    "From a generation's creation to a worker claiming it.",
    buckets=_LATENCY_BUCKETS,
)


def exposition() -> tuple[bytes, str]:
    """The metrics as Prometheus text, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
