"""Recording a new generation, and the ``Idempotency-Key`` that makes a create safe to retry.

A create writes in two places (``broker.keys``): the control slot (the lease entry, the
listing indexes and the arq job, with ``scripts.QUEUE_CREATED``) and the generation's own
slot (its record, with ``scripts.CREATE``). The lease entry is due when the job expires
unstarted: if no worker ever claims the generation, a sweeper ends it then (every generation
ends). The record holds the store epoch: if the store loses the timeline the job ran on, a
claim finds that out (``scripts.CLAIM``).

On one Redis both scripts run in one ``MULTI``. On a cluster no transaction spans two slots:
the control slot's writes go first, the record second. A crash in between leaves a job,
index entries and a lease entry that name a generation that does not exist, never a
generation without its job: the worker that takes such a job waits briefly for the record
(``RECORD_PENDING_MS``: the two writes may just be in flight), then drops it; the sweeper
drops the lease entry, and listings skip ids without a record as they skip expired ones. A
record that was slow to land (its shard failing over) may come after a worker dropped its
job: the job is queued again then (``_queue_again_if_dropped``).

Idempotency. A create with a key claims it in the control-slot script, in the step that
queues the job: from the moment its job exists, the key names the generation (its id,
creation time and request fingerprint), and a create that finds the key taken writes
nothing. So a retry (after a 502, a timeout, an api killed under the first request) finds
no key, and the first create left nothing behind (it runs as new), or finds the key, and
answers that generation. On a cluster the first create may have died between its two
steps: the retry then writes the record the first did not (same id, same creation time,
same request, which the fingerprint proves), and ``CREATE`` never writes over a record, so
of several retries only one does. A key reused for another request is refused
(``IdempotencyKeyReused``) rather than answered with a generation the caller did not ask
for.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker import jobs, keys, scripts
from broker.errors import BrokerError, GenerationNotFound
from broker.keys import MetaField
from broker.log_errors import store_errors
from broker.state import GenerationState, Status, now_ms

if TYPE_CHECKING:
    from broker.generation_log import GenerationLog

#: How long after its job was queued a generation's record may still be on its way: on a
#: Redis Cluster, ``create`` queues the job (and indexes the id) before it writes the record.
#: Past this, an id without a record is one whose create never finished, or that expired.
RECORD_PENDING_MS = 3_000
#: A cluster create whose record took this long after its job was queued queues the job
#: again (``create``): half the wait, for the clocks of api and worker.
REQUEUE_AFTER_SECONDS = RECORD_PENDING_MS / 2000


class IdempotencyKeyReused(BrokerError):
    """An ``Idempotency-Key`` already named a generation made for another request."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(stream_id)
        self.stream_id = stream_id


@dataclass(frozen=True)
class Idempotency:
    """A create's ``Idempotency-Key``: the Redis key that holds it (``keys.idempotency_key``)
    and the fingerprint of the request it stands for (the caller decides what makes two
    requests the same one)."""

    key: str
    fingerprint: str

    def value(self, state: GenerationState) -> str:
        """What the key holds once ``state``'s create claimed it."""
        return f"{state.id} {state.created_at_ms} {self.fingerprint}"


@dataclass(frozen=True)
class Created:
    """A create's outcome: the generation as it was recorded, and whether an earlier create
    with the same idempotency key made it (nothing new was started)."""

    state: GenerationState
    replayed: bool = False


async def create(
    log: GenerationLog, state: GenerationState, idempotency: Idempotency | None = None
) -> Created:
    """Record ``state`` as a new generation, index it for listings and queue its job; or,
    when ``idempotency`` names an earlier create's generation, answer that one."""
    value = idempotency.value(state) if idempotency else ""
    queue = _queue_command(log, state, idempotency, value)
    with store_errors():
        if log.on_cluster:
            queued_at = time.monotonic()
            earlier = await log.redis.eval(*queue)  # type: ignore[misc]
            if earlier is None:
                await log.redis.eval(*_record_command(log, state))  # type: ignore[misc]
                if time.monotonic() - queued_at >= REQUEUE_AFTER_SECONDS:
                    await _queue_again_if_dropped(log, state)
                return Created(state)
        else:
            async with log.redis.pipeline(transaction=True) as pipe:
                pipe.eval(*queue)
                pipe.eval(*_record_command(log, state, idempotency, value))
                earlier, _ = await pipe.execute()
            if earlier is None:
                return Created(state)
    assert idempotency is not None  # only a claimed key turns a create away
    return await _earlier(log, state, idempotency, earlier)


def _queue_command(
    log: GenerationLog, state: GenerationState, idempotency: Idempotency | None, value: str
) -> list[Any]:
    """``EVAL`` arguments of the control slot's part (``scripts.QUEUE_CREATED``). The
    script's text rather than its sha: a transaction of registered scripts would first ask
    whether Redis has them, a round trip more per create."""
    index_keys = keys.index_keys(state.tenant)
    script_keys = [keys.LEASES_KEY, keys.QUEUE_NAME, jobs.job_record_key(state.id), *index_keys]
    if idempotency is not None:
        script_keys.append(idempotency.key)
    expires_ms = log.queue_timeout_seconds * 1000
    args = [
        len(index_keys),
        state.id,
        keys.job_id(state.id),
        jobs.job_record(state.id, state.created_at_ms),
        expires_ms,
        state.created_at_ms,
        state.created_at_ms + expires_ms,  # the lease entry: due when the job expires
        state.created_at_ms - log.retention_seconds * 1000,  # older entries name expired keys
        value,
        _idempotency_seconds(log),
    ]
    return [scripts.QUEUE_CREATED, len(script_keys), *script_keys, *args]


def _idempotency_seconds(log: GenerationLog) -> int:
    """How long a create's ``Idempotency-Key`` is kept: never longer than its generation
    (Redis's retention, and the archive's when it has one), or a retry after the generation
    was deleted would make it again."""
    lives = [keys.IDEMPOTENCY_SECONDS, log.retention_seconds]
    if log.archive is not None and log.archive.retention_seconds:
        lives.append(log.archive.retention_seconds)
    return min(lives)


def _record_command(
    log: GenerationLog,
    state: GenerationState,
    idempotency: Idempotency | None = None,
    value: str = "",
) -> list[Any]:
    """``EVAL`` arguments of the generation's own part (``scripts.CREATE``). With
    ``idempotency`` (a single Redis's transaction), the record is written only if the key
    still names this generation after the control slot's part ran."""
    queue_deadline = state.created_at_ms + log.queue_timeout_seconds * 1000
    fields = {**state.to_hash(), MetaField.LEASE_UNTIL_MS: queue_deadline}
    flat = [item for pair in fields.items() for item in pair]
    script_keys = [keys.meta_key(state.id)]
    if idempotency is not None:
        script_keys.append(idempotency.key)
    return [scripts.CREATE, len(script_keys), *script_keys, log.retention_seconds, value, *flat]


async def _earlier(
    log: GenerationLog, state: GenerationState, idempotency: Idempotency, held: bytes | str
) -> Created:
    """The generation an earlier create with the same key made, as that create recorded it.

    Its record may be missing on a cluster (the earlier create died between its two steps,
    or its record is still on its way): it is written now, as the earlier create would have
    written it, and its job queued again if a worker dropped it meanwhile."""
    text = held.decode() if isinstance(held, bytes) else held
    stream_id, created_at_ms, fingerprint = text.split(" ", 2)
    if fingerprint != idempotency.fingerprint:
        raise IdempotencyKeyReused(stream_id)
    original = dataclasses.replace(state, id=stream_id, created_at_ms=int(created_at_ms))
    try:
        await log.get(stream_id)
    except GenerationNotFound:
        with store_errors():
            await log.redis.eval(*_record_command(log, original))  # type: ignore[misc]
            await _queue_again_if_dropped(log, original)
    return Created(original, replayed=True)


async def _queue_again_if_dropped(log: GenerationLog, state: GenerationState) -> None:
    """Queue the job again if a worker dropped it: the record took so long (its shard
    failing over) that a worker took the job, waited ``RECORD_PENDING_MS`` for the record
    and gave up. Then the job's record is gone (arq deletes it when a worker is done with a
    job, and only then) and the generation is still queued: no worker has it, none can
    claim it. A job still there, or a generation claimed, is left alone: a second job would
    take over the running attempt."""
    if await log.redis.exists(jobs.job_record_key(state.id)):
        return
    status = await log.redis.hget(keys.meta_key(state.id), MetaField.STATUS)  # type: ignore[misc]
    if status != Status.QUEUED.value.encode():
        return
    async with log.redis.pipeline() as pipe:
        jobs.queue_generation(pipe, state.id, now_ms(), expires_ms=log.queue_timeout_seconds * 1000)
        await pipe.execute()
