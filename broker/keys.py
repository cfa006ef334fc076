"""Every Redis key the broker uses, the fields of a generation's meta hash, and the defaults
of their lifetimes.

Kept in one module (as arq keeps its keys in ``arq/constants.py``) so that anyone reading
Redis, writing a migration or sharding the data can see the whole layout at once. Two places
still spell the meta hash's field names out themselves: the Lua scripts (``broker.scripts``),
which are Redis-side text, and ``GenerationState.from_hash`` / ``to_hash`` (``broker.state``),
which turn the whole hash into the typed record and back.

Two kinds of key, placed for Redis Cluster (a single Redis does not care):

- a generation's own keys share the hash tag ``{<id>}``: one slot holds them, so the scripts
  that change several of them at once run on whichever node owns it, and generations spread
  over every node by their ids;
- the keys of the whole deployment (the listing indexes, the lease index, arq's queue and
  its job records) share the hash tag ``{control}``: the *control slot*, on one node. Creates,
  claims and listings touch several of them in one step (a transaction or a script), and
  arq's worker needs its queue and its job keys together (``job_id``). What the control
  slot costs: its node takes a few small writes per generation (against the hundreds of
  appends its log gets wherever it lives), and a listing reads one index there, then the
  page's meta hashes wherever they are.
"""

from __future__ import annotations

import hashlib

PREFIX = "sb"

#: The hash tag of every deployment-wide key: one cluster slot holds them all.
CONTROL_TAG = "{control}"
CONTROL = f"{PREFIX}:{CONTROL_TAG}"

#: arq queue the api enqueues ``generate`` jobs on and the workers read.
QUEUE_NAME = f"{CONTROL}:queue"

#: Where arq keeps the ids of jobs to abort, in place of its fixed ``arq:abort``: its worker
#: touches that key in the transaction that starts and the one that finishes every job,
#: beside the job's own keys, which a Redis Cluster refuses unless all share the control
#: slot (``workers.worker`` points arq at this one).
ARQ_ABORT_KEY = f"{CONTROL}:abort"

#: Sorted set of every generation id, scored by creation time (ms): the index for listings.
INDEX_KEY = f"{CONTROL}:index"

#: Sorted set of claimed generations, scored by when their writer's lease lapses (ms): where
#: the lease sweeper looks for generations whose worker died. Kept outside the per-generation
#: scripts (their keys share one cluster slot; this key does not): writers update it beside
#: each claim and renewal, and the lease in the meta hash, not this score, decides.
LEASES_KEY = f"{CONTROL}:leases"

#: What ``/readyz`` writes (and lets expire at once) to learn that the master takes writes: a
#: master cut off from its replicas answers ``ROLE`` as a master yet refuses every write
#: (``NOREPLICAS``, with ``min-replicas-to-write``).
READY_PROBE_KEY = f"{CONTROL}:readyz"
#: Sorted set of the generations an archiver has to look at (``broker.pg_archive``): id →
#: when it is due (ms, Redis's clock): at once when it ends, to be copied; then, once copied,
#: when its keys may go. Only with ``BROKER_ARCHIVE_URL``.
ARCHIVE_DUE_KEY = f"{CONTROL}:archive"
#: Sorted set of the ended generations not copied to the archive yet: id → when it ended (ms,
#: Redis's clock). Its oldest entry is the archive's lag.
ARCHIVE_PENDING_KEY = f"{CONTROL}:archive:pending"
READY_PROBE_MS = 5_000

#: How long an ``Idempotency-Key`` answers the generation its first create made (or the
#: retention, when that is shorter: the key never outlives its generation).
IDEMPOTENCY_SECONDS = 24 * 3600

#: Field of each stream entry that holds the msgpack-encoded event.
EVENT_FIELD = "e"


class MetaField:
    """The fields of a generation's meta hash (``meta_key``). Every value is a string:
    times are ms since 1970, counts decimal digits, structured values JSON text."""

    ID = "id"
    MODEL = "model"
    #: ``broker.state.Status``: queued, running, then completed, failed or cancelled.
    STATUS = "status"
    #: The API key's tenant that created the generation; empty when auth is off.
    TENANT = "tenant"
    #: The create request, JSON (``broker.request.GenerationRequest.to_dict``).
    REQUEST = "request"
    #: The client's metadata, a JSON object.
    METADATA = "metadata"
    CREATED_AT_MS = "created_at_ms"
    STARTED_AT_MS = "started_at_ms"
    FIRST_TOKEN_AT_MS = "first_token_at_ms"
    FINISHED_AT_MS = "finished_at_ms"
    #: The fencing token: bumped by every claim and takeover; appends must carry it.
    ATTEMPT = "attempt"
    #: The sequence number of the last event appended (0: none yet).
    LAST_SEQ = "last_seq"
    #: When the writer's lease (or, while queued, the queue deadline) lapses, Redis's clock.
    LEASE_UNTIL_MS = "lease_until_ms"
    #: Who holds the generation: a worker's id, or ``sweeper:<owner>`` ending it.
    WORKER = "worker"
    #: The token of the last batch appended, so a retried batch is not written twice.
    LAST_BATCH = "last_batch"
    #: "1" once a client asked to cancel.
    CANCEL_REQUESTED = "cancel_requested"
    #: Set with the terminal event: ``done``'s finish reason and usage (JSON), or the
    #: ``error`` event's payload (JSON).
    FINISH_REASON = "finish_reason"
    USAGE = "usage"
    ERROR = "error"
    #: The first sequence number Redis lost after it was appended (``mark_lost``), or the
    #: first a reader may hold from a timeline the store lost (a sweep after a failover).
    LOST_FROM_SEQ = "lost_from_seq"
    #: The store epoch (the master's replication id, which a failover or a restart replaces)
    #: under which the generation was created or last continued by its writer. A generation
    #: last written under another epoch than the store's now may have had events on a lost
    #: timeline (``broker.scripts``). Store-local: an export leaves it out.
    EPOCH = "epoch"
    #: Event connections opened on the generation, and how many of them were resumes.
    CONNECTIONS = "connections"
    RESUMES = "resumes"
    #: The id the generation had in the file it was imported from (``broker.archive``).
    IMPORTED_FROM = "imported_from"
    #: How many times a new attempt continued the generation after its writer was lost or
    #: stopped (``workers.continuation``), and how many of them after a lost one (what
    #: ``BROKER_MAX_CONTINUATIONS`` bounds); absent: never.
    CONTINUATIONS = "continuations"
    CONTINUATIONS_LOST = "continuations_lost"
    #: While a continuation waits for a worker: its number (the ``continuations`` it will
    #: make), which only its own job may claim (``scripts.CLAIM``); absent otherwise.
    HANDOVER = "handover"
    #: Why the last writer stopped (``worker_lost``, ``worker_stopped``), as the next
    #: continuation's ``resumed`` event says; and when the pending hand-over began.
    HANDOVER_REASON = "handover_reason"
    HANDOVER_SINCE_MS = "handover_since_ms"
    #: How many times the pending continuation's job was queued (part of its job id).
    HANDOVER_QUEUED = "handover_queued"
    #: When its copy in the PostgreSQL archive was committed (``broker.pg_archive``); its
    #: keys here are deleted ``BROKER_ARCHIVE_AFTER_SECONDS`` later. Store-local.
    ARCHIVED_AT_MS = "archived_at_ms"


#: Meta fields that describe the store a generation is in rather than the generation: an
#: export leaves them out and an import drops them (``broker.archive``).
STORE_LOCAL_FIELDS = frozenset({MetaField.EPOCH, MetaField.ARCHIVED_AT_MS})

#: Default retention of a generation's keys after it was created or last written (7 days).
DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600

#: Lifetime of an import's staging keys, renewed with each batch written to them: an import
#: that was abandoned (its process died) leaves nothing behind for longer.
IMPORT_STAGING_SECONDS = 60


def job_id(stream_id: str) -> str:
    """The arq job id of the generation's ``generate`` job. arq names its keys of a job
    ``arq:job:<job id>``, ``arq:in-progress:<job id>``…: the control tag in the id puts them
    in the control slot beside the queue, where arq's worker touches them together."""
    return f"{CONTROL_TAG}{stream_id}"


def continuation_job_id(stream_id: str, number: int, queued: int = 1) -> str:
    """The arq job id of the generation's ``number``-th continuation, queued for the
    ``queued``-th time. Each has an id of its own: arq holds a job's id after a worker that
    took it was killed (its in-progress key outlives it by the job timeout), so a job queued
    again under an id arq holds would never run; ``scripts.CLAIM`` admits only the pending
    number, so of several jobs of one continuation one runs."""
    return f"{CONTROL_TAG}{stream_id}~{number}.{queued}"


def log_key(stream_id: str) -> str:
    """The Redis Stream holding the generation's events, entry ids ``0-<seq>``."""
    return f"{PREFIX}:{{{stream_id}}}:log"


def meta_key(stream_id: str) -> str:
    """The hash holding the generation's request, status, fencing token and result."""
    return f"{PREFIX}:{{{stream_id}}}:meta"


def text_key(stream_id: str) -> str:
    """A string the append script extends with every token batch: the text so far, in O(1)."""
    return f"{PREFIX}:{{{stream_id}}}:text"


def import_keys(stream_id: str, token: str) -> tuple[str, str, str]:
    """``(log, text, done)`` where an import stages a generation's events and text until it
    renames them into place at once (``broker.archive``), and the short-lived mark its
    commit leaves, so that a commit run again (its reply was lost) knows it landed. Beside
    the generation's own keys (same hash tag, so the rename stays in one cluster slot);
    ``token`` keeps concurrent imports apart."""
    staging = f"{PREFIX}:{{{stream_id}}}:import:{token}"
    return f"{staging}:log", f"{staging}:text", f"{staging}:done"


def pulse_channel(stream_id: str) -> str:
    """The sharded Pub/Sub channel every append to the generation publishes its new last
    sequence number on, on a Redis Cluster only: there the reader hub cannot ``XREAD`` many
    logs at once (they live in other slots), so it listens for these and then reads the log
    that moved (``api.cluster_tail``). Same hash tag as the generation's keys: the append
    script may publish it, and one node serves it."""
    return f"{PREFIX}:{{{stream_id}}}:pulse"


def stream_id_of(log: str) -> str:
    """``sb:{<id>}:log`` → ``<id>`` (the inverse of ``log_key``)."""
    return log[log.index("{") + 1 : log.index("}")]


def hub_wake_key(token: str) -> str:
    """A small stream one api process's reader hub also reads: an entry ends its blocking
    read at once, so a newly watched stream is included without waiting for a timeout."""
    return f"{PREFIX}:hub:{token}"


#: The one field of a hub wake entry (its value does not matter: the entry is the signal).
HUB_WAKE_FIELD = "w"
#: Lifetime of a hub's wake stream, renewed with each wake: a process that died without
#: deleting its own leaves it behind for no longer.
HUB_WAKE_SECONDS = 3600


def tenant_index_key(tenant: str) -> str:
    """One tenant's generations, scored by creation time (ms): its listings (auth on)."""
    return f"{INDEX_KEY}:{tenant}"


def index_keys(tenant: str) -> tuple[str, ...]:
    """The listing indexes a generation enters: the one of all, and its tenant's if it has
    one."""
    return (INDEX_KEY, tenant_index_key(tenant)) if tenant else (INDEX_KEY,)


def idempotency_key(tenant: str, key: str) -> str:
    """Where a tenant's ``Idempotency-Key`` names the generation its first create made. In
    the control slot, because the create's control-slot script sets it in the same step
    that queues the job (``broker.creation``). The client's key is hashed with the tenant:
    any bytes a client sends make one fixed-size key, and tenants never share one."""
    digest = hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()
    return f"{CONTROL}:idem:{digest}"


def listing_index_key(tenant: str | None) -> str:
    """The index a listing reads: its tenant's (auth on), else the one of all generations."""
    return tenant_index_key(tenant) if tenant else INDEX_KEY


def connections_key(tenant: str) -> str:
    """Sorted set of a tenant's open event connections (slot id → expiry, ms), across every
    api process: the per-tenant connection limit counts it."""
    return f"{PREFIX}:conns:{tenant}"


def generation_keys(stream_id: str) -> tuple[str, str, str]:
    """``(meta, log, text)``: the order the Lua scripts take their KEYS in."""
    return meta_key(stream_id), log_key(stream_id), text_key(stream_id)
