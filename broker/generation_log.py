"""The generation log: creating generations, claims and fencing, reading and tailing events.

``GenerationLog`` is how every process creates, claims, ends and reads a generation. The
Redis layout it works on is ``keys``'s (every key name and meta-hash field), its atomic
changes are the Lua ``scripts``. A few modules reach those keys themselves, by the names in
``keys``, for work the log has no call for: the listing (its indexes), the archive (an
import's staging keys and the rename into place), the api's reader hub (one ``XREAD`` over
many logs) and its connection slots (a tenant's open connections).

Writers go through ``LogWriter`` (``broker.log_writer``), which owns one attempt's fencing
token and the next sequence number; every append is one script call that checks both before
it ``XADD``s, so a writer that lost its claim can never append again, and a retried append
cannot duplicate.

The scripts also keep the generation's store epoch (``keys.MetaField.EPOCH``): a failover or
a restart may have lost events readers hold, so a generation last written under another
epoch is never claimed again, and a sweeper that takes it over records the possible loss
(``TakeOver.claim.timeline_changed``) before it ends it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from broker import creation, earlier_attempts, events, jobs, keys, scripts
from broker.appends import append_args, final_status
from broker.creation import RECORD_PENDING_MS, Created, Idempotency
from broker.errors import (
    ClaimRefused,
    GenerationEnded,
    GenerationNotFound,
    StaleWriter,
    StoreUnavailable,
)
from broker.events import Event, entry_id, seq_from_entry_id
from broker.keys import MetaField
from broker.log_errors import script_refusals, store_errors
from broker.log_writer import LogWriter
from broker.pg_archive.store import Snapshot
from broker.replica_wait import ReplicaWait, ShortfallReport
from broker.state import GenerationState, Status, now_ms
from broker.store_connections import StoreClient
from broker.store_scripts import StoreScript

if TYPE_CHECKING:
    from broker.pg_archive.store import ArchiveStore
    from broker.settings import GenerationSettings

# ``RECORD_PENDING_MS``, ``final_status``, ``LogWriter`` and ``store_errors`` live in the
# modules of their own concerns; they stay importable from here, where the workers, the api
# and the archive have always found them.
__all__ = [
    "RECORD_PENDING_MS",
    "Claim",
    "GenerationLog",
    "HandOver",
    "LogWriter",
    "TakeOver",
    "final_status",
    "store_errors",
]


logger = logging.getLogger("streambroker.writer")

#: Events per ``XRANGE`` while the archiver reads a finished generation.
_SNAPSHOT_PAGE = 1000

#: How long a worker has to claim a continuation once it was handed over, before a sweeper
#: queues its job again (same number: never a second continuation). Generous: a busy worker
#: pool may take a while to reach it, and queueing it again is only a safety net for a job
#: that was lost (its queueing failed, or the process queueing it died just before).
HANDOVER_PICKUP_SECONDS = 30.0


@dataclass(frozen=True)
class TakeOver:
    """What the lease sweeper found: ``taken`` (the writer's lease had lapsed; ``claim`` is
    the sweeper's, the writer is fenced), ``live`` (the lease holds until ``lease_until_ms``),
    ``ended`` (not running any more) or ``gone`` (expired or deleted)."""

    outcome: Literal["taken", "live", "ended", "gone"]
    claim: Claim | None = None
    lease_until_ms: int = 0


@dataclass(frozen=True)
class Claim:
    attempt: int
    #: Events already in the log when this attempt began (non-zero: an earlier attempt wrote).
    last_seq: int
    cancel_requested: bool
    #: The status the generation had before this claim (``queued``: no worker started it).
    was: Status = Status.RUNNING
    #: A sweeper's take-over only: the generation was last written under another store
    #: epoch, so readers may hold events past ``last_seq`` that the store lost; the take-over
    #: recorded ``last_seq + 1`` as lost.
    timeline_changed: bool = False
    #: A worker's claim: how many continuations the generation has had, this one included
    #: (non-zero: this attempt continues what earlier ones wrote), and why the last writer
    #: stopped (``worker_lost``, ``worker_stopped``; '' when none did).
    continuations: int = 0
    reason: str = ""
    #: Of ``continuations``, those after a lost worker (what ``BROKER_MAX_CONTINUATIONS``
    #: bounds: a graceful stop says nothing about the request).
    lost_continuations: int = 0


@dataclass(frozen=True)
class HandOver:
    """What ``GenerationLog.hand_over`` did: ``queued`` (continuation ``number`` is pending
    and its job queued; the hander is fenced), ``cancel`` (a client asked to cancel: end it
    so), ``limit`` (it had ``number`` continuations after lost workers, the most allowed) or
    ``expired`` (continuation ``number`` waited too long for a worker)."""

    outcome: Literal["queued", "cancel", "limit", "expired"]
    number: int = 0
    #: When the pending continuation must have been claimed (ms, Redis's clock).
    deadline_ms: int = 0
    #: Why the writer stopped, as recorded at the continuation's first hand-over.
    reason: str = ""
    #: The first hand-over of this continuation (not its job queued again).
    new: bool = False
    #: Its job is in the queue (False: queueing failed; a sweeper queues it again at
    #: ``deadline_ms``).
    job_queued: bool = True


class GenerationLog:
    def __init__(
        self,
        redis: StoreClient,
        *,
        retention_seconds: int,
        queue_timeout_seconds: int = jobs.DEFAULT_QUEUE_TIMEOUT_SECONDS,
        replica_wait: ReplicaWait | None = None,
    ) -> None:
        self.redis = redis
        #: A Redis Cluster: no transaction may span a generation's slot and the control slot.
        self.on_cluster = isinstance(redis, RedisCluster)
        self.retention_seconds = retention_seconds
        #: How long a generation may stay queued: its arq job expires then, and the sweeper
        #: ends the generation (``queue_timeout``) instead of leaving it queued for good.
        self.queue_timeout_seconds = queue_timeout_seconds
        #: Replicas every append waits for (``broker.replica_wait``); none by default.
        self.replica_wait = replica_wait or ReplicaWait()
        self._shortfalls = ShortfallReport(self.replica_wait)
        self._claim_script = StoreScript(redis, scripts.CLAIM)
        self._append_script = StoreScript(redis, scripts.APPEND)
        self._cancel_script = StoreScript(redis, scripts.REQUEST_CANCEL)
        self._renew_script = StoreScript(redis, scripts.RENEW)
        self._take_over_script = StoreScript(redis, scripts.TAKE_OVER)
        self._hand_over_script = StoreScript(redis, scripts.HAND_OVER)
        self._open_watch_script = StoreScript(redis, scripts.OPEN_WATCH)
        self._read_state_script = StoreScript(redis, scripts.READ_STATE)
        self._lapsed_script = StoreScript(redis, scripts.LAPSED)
        self._index_lease_script = StoreScript(redis, scripts.INDEX_LEASE)
        self._mark_lost_script = StoreScript(redis, scripts.MARK_LOST)
        self._ended_script = StoreScript(redis, scripts.ENDED)
        self._take_archive_due_script = StoreScript(redis, scripts.TAKE_ARCHIVE_DUE)
        self._mark_archived_script = StoreScript(redis, scripts.MARK_ARCHIVED)
        self._drop_archived_script = StoreScript(redis, scripts.DROP_ARCHIVED)
        #: The PostgreSQL archive (``broker.pg_archive``), when ``BROKER_ARCHIVE_URL`` is set:
        #: every read of a generation Redis no longer holds is answered from it, and every
        #: generation that ends is put in the archiver's due set.
        self.archive: ArchiveStore | None = None

    @classmethod
    def from_settings(cls, redis: StoreClient, settings: GenerationSettings) -> GenerationLog:
        """The log as a process configured with ``settings`` uses it (lifetimes, the replicas
        appends wait for)."""
        return cls(
            redis,
            retention_seconds=settings.retention_seconds,
            queue_timeout_seconds=settings.queue_timeout_seconds,
            replica_wait=ReplicaWait.from_settings(settings),
        )

    async def create(
        self, state: GenerationState, idempotency: Idempotency | None = None
    ) -> Created:
        """Record a new generation, index it for listings and queue its job; with
        ``idempotency``, answer instead the generation an earlier create with the same key
        made (``broker.creation`` has the steps, and what a crash between them leaves)."""
        return await creation.create(self, state, idempotency)

    async def get(self, stream_id: str) -> GenerationState:
        raw, text = await self.get_raw(stream_id)
        return GenerationState.from_hash(raw, text)

    async def get_raw(self, stream_id: str) -> tuple[dict[bytes, bytes], bytes | None]:
        """The meta hash as stored and the text, read together (from the archive once Redis
        let the generation go); ``GenerationNotFound``."""
        with store_errors():
            flat, body = await self._read_state_script(keys=list(keys.generation_keys(stream_id)))
        if flat:
            return dict(zip(flat[::2], flat[1::2], strict=True)), body
        if self.archive is None:
            raise GenerationNotFound(stream_id)
        return await self.archive.get_raw(stream_id)

    async def meta_hashes(self, stream_ids: Sequence[str]) -> list[dict[bytes, bytes]]:
        """The meta hashes of several generations as stored, in one round trip (a listing's
        page); an empty one for a generation that no longer exists."""
        with store_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream_id in stream_ids:
                    pipe.hgetall(keys.meta_key(stream_id))
                hashes: list[dict[bytes, bytes]] = await pipe.execute()
        return hashes

    async def open_watch(
        self, stream_id: str, *, resumed: bool, tenant: str | None = None
    ) -> GenerationState:
        """``get``, for a client opening the events: also counts the connection (and the
        resume) on the generation, in the same round trip. With ``tenant``, another
        tenant's generation reads as missing (and is not counted)."""
        with store_errors():
            reply = await self._open_watch_script(
                keys=list(keys.generation_keys(stream_id)), args=[int(resumed), tenant or ""]
            )
        if reply:
            flat, text = reply
            raw = dict(zip(flat[::2], flat[1::2], strict=True))
            return GenerationState.from_hash(raw, text)
        if self.archive is None:
            raise GenerationNotFound(stream_id)
        raw, text = await self.archive.open_watch(stream_id, resumed=resumed, tenant=tenant)
        return GenerationState.from_hash(raw, text)

    async def claim(
        self,
        stream_id: str,
        *,
        worker: str,
        lease_seconds: float,
        continuation: int = 0,
        only_to_end: bool = False,
    ) -> Claim:
        """Start a new attempt: every writer of an earlier attempt is fenced from now on.

        The generation is put in the lease index, due a lease from now, *before* the claim:
        whatever happens after (the claim's reply is lost, this process dies), a sweeper
        finds it and ends it if no writer renews it. (A separate step rather than part of
        the claim script: the index is one key for all generations, which a Redis Cluster
        keeps in another slot than the generation's own keys.) An entry left by a claim
        that did not happen is harmless: the sweeper finds the generation still queued with
        its queue deadline ahead, and puts the entry back at that deadline.

        ``ClaimRefused`` where a sweeper ends the generation instead (``scripts.CLAIM``),
        among them a generation last written under another store epoch: a new attempt
        there could put other text under ids that readers hold from a lost timeline; and
        while a hand-over is pending, to every job but its ``continuation``'s.
        ``only_to_end``: a claim to end the generation (a cancel), not counted as a
        continuation of it.
        """
        lease_ms = int(lease_seconds * 1000)
        with store_errors():
            await self._index_lease_script(keys=[keys.LEASES_KEY], args=[stream_id, lease_ms])
        with store_errors(), script_refusals(stream_id):
            reply = await self._claim_script(
                keys=list(keys.generation_keys(stream_id)),
                args=[worker, now_ms(), lease_ms, continuation, 0 if only_to_end else 1],
            )
        attempt, last_seq, cancel, _, continuations, reason, lost = reply
        return Claim(
            attempt=int(attempt),
            last_seq=int(last_seq),
            cancel_requested=bool(cancel),
            continuations=int(continuations),
            reason=_text(reason),
            lost_continuations=int(lost),
        )

    async def hand_over(
        self,
        stream_id: str,
        attempt: int,
        *,
        reason: str,
        max_continuations: int,
        pickup_seconds: float = HANDOVER_PICKUP_SECONDS,
    ) -> HandOver:
        """Hand the generation ``attempt`` holds over to a continuation (``scripts.HAND_OVER``:
        ``attempt`` is fenced once it is ``queued``), and queue the continuation's job;
        ``StaleWriter`` / ``GenerationEnded`` when ``attempt`` no longer holds it.

        Two steps (the job lives in the control slot). Once the first has landed, the
        continuation is the generation's future whatever happens to the second: a failure to
        queue the job is logged and reported (``job_queued``), not raised, and a sweeper
        hands it over again at ``pickup_seconds``, under the same number. The lease index
        entry moves to that deadline too."""
        pickup_ms = int(pickup_seconds * 1000)
        give_up_ms = self.queue_timeout_seconds * 1000
        with store_errors(), script_refusals(stream_id):
            reply = await self._hand_over_script(
                keys=list(keys.generation_keys(stream_id)),
                args=[attempt, reason, max_continuations, pickup_ms, give_up_ms],
            )
        outcome = _text(reply[0])
        number = int(reply[1]) if len(reply) > 1 else 0
        if outcome != "queued":
            return HandOver(outcome, number)  # type: ignore[arg-type]
        deadline, queued, recorded, new = int(reply[2]), int(reply[3]), _text(reply[4]), reply[5]
        handed = HandOver("queued", number, deadline, recorded, bool(new))
        try:
            with store_errors():
                await jobs.queue_continuation(
                    self.redis, stream_id, number, now_ms(), queued=queued, expires_ms=give_up_ms
                )
                await self.index_lease(stream_id, deadline)
        except StoreUnavailable as exc:
            logger.warning(
                "generation %s: continuation %d handed over but not queued (%s); a sweeper "
                "queues it again in %.0f s",
                stream_id,
                number,
                exc,
                pickup_seconds,
                extra={"stream_id": stream_id},
            )
            return dataclasses.replace(handed, job_queued=False)
        return handed

    async def mark_lost(self, stream_id: str, first_lost: int) -> None:
        """Record that events from ``first_lost`` on were lost by the store after they were
        appended (and maybe read). Kept as the lowest such id ever seen, in one step (two
        writers' records cannot undo each other); a generation that no longer exists is
        left alone."""
        with store_errors():
            await self._mark_lost_script(keys=[keys.meta_key(stream_id)], args=[first_lost])

    async def ended(self, stream_id: str, *, due_in_ms: int = 0) -> None:
        """A generation ended: out of the lease index and, with an archive, into the
        archiver's due set (``scripts.ENDED``), due ``due_in_ms`` from now."""
        with store_errors():
            await self._ended_script(
                keys=[keys.LEASES_KEY, keys.ARCHIVE_DUE_KEY, keys.ARCHIVE_PENDING_KEY],
                args=[stream_id, int(self.archive is not None), due_in_ms],
            )

    # ------------------------------------------------ the archiver's steps (broker.pg_archive)

    async def take_archive_due(
        self, *, limit: int, claim_ms: int, now: int | None = None
    ) -> list[str]:
        """Generations due for the archiver, each held ``claim_ms`` for the caller."""
        with store_errors():
            ids = await self._take_archive_due_script(
                keys=[keys.ARCHIVE_DUE_KEY], args=["" if now is None else now, limit, claim_ms]
            )
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def archive_due_at(self, stream_id: str, due_ms: int) -> None:
        with store_errors():
            await self.redis.zadd(keys.ARCHIVE_DUE_KEY, {stream_id: due_ms}, xx=True)

    async def archive_copied(self, stream_id: str, due_ms: int) -> None:
        """Its copy is committed (and recorded): due again at ``due_ms``, to be let go."""
        with store_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(keys.ARCHIVE_DUE_KEY, {stream_id: due_ms}, xx=True)
                pipe.zrem(keys.ARCHIVE_PENDING_KEY, stream_id)
                await pipe.execute()

    async def oldest_not_archived(self) -> int | None:
        """When the generation that ended longest ago without a copy yet ended (ms)."""
        with store_errors():
            oldest = await self.redis.zrange(keys.ARCHIVE_PENDING_KEY, 0, 0, withscores=True)
        return int(oldest[0][1]) if oldest else None

    async def archive_done(self, stream_id: str, tenant: str) -> None:
        """The archiver is done with a generation: out of its due set and the listing
        indexes (the archive lists it now)."""
        await self._unlist(stream_id, keys.index_keys(tenant))

    async def stored_meta(self, stream_id: str) -> dict[bytes, bytes] | None:
        """The meta hash as Redis holds it; None when it holds no such generation (no
        fallback to the archive: the archiver asks what is still here)."""
        with store_errors():
            raw: dict[bytes, bytes] = await self.redis.hgetall(keys.meta_key(stream_id))  # type: ignore[misc]
        return raw or None

    async def snapshot(self, stream_id: str) -> Snapshot | None:
        """The generation's meta hash, text and every event, for the archive; None when Redis
        no longer holds it. For a finished generation only (its log no longer changes): the
        events are read in pages, not in one script, so a long log never blocks Redis."""
        with store_errors():
            flat, text = await self._read_state_script(keys=list(keys.generation_keys(stream_id)))
        if not flat:
            return None
        events: list[tuple[int, bytes]] = []
        start = "-"
        field = keys.EVENT_FIELD.encode()
        while True:
            with store_errors():
                page = await self.redis.xrange(
                    keys.log_key(stream_id), min=start, count=_SNAPSHOT_PAGE
                )
            events += [(seq_from_entry_id(entry), fields[field]) for entry, fields in page]
            if len(page) < _SNAPSHOT_PAGE:
                break
            start = f"({page[-1][0].decode()}"
        return Snapshot(
            stream_id, dict(zip(flat[::2], flat[1::2], strict=True)), text or b"", events
        )

    async def mark_archived(self, stream_id: str, at_ms: int) -> bool:
        with store_errors():
            return bool(
                await self._mark_archived_script(keys=[keys.meta_key(stream_id)], args=[at_ms])
            )

    async def drop_archived(self, stream_id: str, meta: dict[bytes, bytes]) -> str:
        """Delete an archived generation's keys unless its meta hash changed since ``meta``
        was read (``scripts.DROP_ARCHIVED``)."""

        def field(name: str) -> str:
            return meta.get(name.encode(), b"0").decode()

        with store_errors():
            outcome = await self._drop_archived_script(
                keys=list(keys.generation_keys(stream_id)),
                args=[
                    field(MetaField.LAST_SEQ),
                    field(MetaField.CONNECTIONS),
                    field(MetaField.RESUMES),
                ],
            )
        return outcome.decode() if isinstance(outcome, bytes) else str(outcome)

    async def archive_forget(self, stream_id: str) -> None:
        """The archiver has nothing to do with it (Redis no longer holds it, or it has not
        ended): out of its due and pending sets; listings are left alone."""
        await self._unlist(stream_id, ())

    async def _unlist(self, stream_id: str, indexes: Sequence[str]) -> None:
        """Out of the archiver's due and pending sets, and of ``indexes``."""
        with store_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in (keys.ARCHIVE_DUE_KEY, keys.ARCHIVE_PENDING_KEY, *indexes):
                    pipe.zrem(key, stream_id)
                await pipe.execute()

    async def index_lease(self, stream_id: str, lease_until_ms: int) -> None:
        """Move the generation's entry in the lease index (``XX``: never re-adds one that
        was removed because the generation ended)."""
        with store_errors():
            await self.redis.zadd(keys.LEASES_KEY, {stream_id: lease_until_ms}, xx=True)

    async def unindex_lease(self, stream_id: str) -> None:
        with store_errors():
            await self.redis.zrem(keys.LEASES_KEY, stream_id)

    async def lapsed_leases(self, *, limit: int, now: int | None = None) -> list[str]:
        """Generations whose lease index entry lapsed, longest lapsed first. Lapsed by Redis's
        clock, or by ``now`` when given (tests move time forward)."""
        with store_errors():
            ids = await self._lapsed_script(
                keys=[keys.LEASES_KEY], args=["" if now is None else now, limit]
            )
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def take_over(
        self, stream_id: str, *, owner: str, lease_seconds: float, now: int | None = None
    ) -> TakeOver:
        """Fence a writer whose lease lapsed (or a queued generation whose job expired) and
        claim the generation for ``owner``; one atomic step, so of several sweepers exactly
        one takes it. Lapsed by Redis's clock, or by ``now`` when given. A generation last
        written under another store epoch is recorded as lost from ``last_seq + 1`` in the
        same step (``claim.timeline_changed``)."""
        with store_errors():
            reply = await self._take_over_script(
                keys=list(keys.generation_keys(stream_id)),
                args=[owner, "" if now is None else now, int(lease_seconds * 1000)],
            )
        outcome = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if outcome == "taken":
            was = reply[4].decode() if isinstance(reply[4], bytes) else str(reply[4])
            claim = Claim(
                attempt=int(reply[1]),
                last_seq=int(reply[2]),
                cancel_requested=bool(reply[3]),
                was=Status(was),
                timeline_changed=bool(reply[5]),
            )
            return TakeOver("taken", claim=claim)
        if outcome == "live":
            return TakeOver("live", lease_until_ms=int(reply[1]))
        return TakeOver("ended" if outcome == "ended" else "gone")

    async def end_claimed(
        self, stream_id: str, claim: Claim, terminal: Callable[[int], Event]
    ) -> GenerationState | None:
        """End a generation this process claimed only to end it (a queued cancel, a sweep):
        ``metadata`` first if nothing was written yet, then ``terminal(t)``. A writer that
        took it over in between, or an end that came first, stands.

        Returns the state read before the end when this call ended it, else None.
        """
        state = await self.get(stream_id)
        t = now_ms() - state.created_at_ms
        batch = []
        if claim.last_seq == 0:
            batch.append(events.metadata(state, attempt=claim.attempt, t=t))
        batch.append(terminal(t))
        try:
            await self.writer(stream_id, claim, lease_seconds=5).append(*batch)
        except (GenerationEnded, StaleWriter):
            return None
        return state

    def writer(self, stream_id: str, claim: Claim, *, lease_seconds: float) -> LogWriter:
        return LogWriter(self, stream_id, claim.attempt, claim.last_seq + 1, lease_seconds)

    async def request_cancel(self, stream_id: str) -> Status:
        """Flag the generation for cancellation; returns its status at that moment."""
        try:
            with store_errors(), script_refusals(stream_id):
                status = await self._cancel_script(keys=list(keys.generation_keys(stream_id)))
        except GenerationNotFound:
            if self.archive is None:
                raise
            return (await self.get(stream_id)).status  # archived: it ended long ago
        return Status(status.decode() if isinstance(status, bytes) else status)

    async def model_of(self, stream_id: str) -> str:
        """The generation's model; ``GenerationNotFound`` when it no longer exists."""
        with store_errors():
            model = await self.redis.hget(keys.meta_key(stream_id), MetaField.MODEL)  # type: ignore[misc]
        if model is None:
            raise GenerationNotFound(stream_id)
        return model.decode() if isinstance(model, bytes) else str(model)

    async def position(self, stream_id: str) -> tuple[Status, int] | None:
        """``(status, last_seq)``, or None when the generation no longer exists."""
        with store_errors():
            status, last_seq = await self.redis.hmget(  # type: ignore[misc]
                keys.meta_key(stream_id), [MetaField.STATUS, MetaField.LAST_SEQ]
            )
        if status is None:
            return None
        return Status(status.decode()), int(last_seq or 0)

    async def cancel_queued(self, stream_id: str, *, continuation: int = 0) -> bool:
        """End a generation no worker has started, as ``done``/``cancelled``, right away;
        False when a worker ended it first. With ``continuation``, one handed over whose
        continuation of that number no worker has started yet.

        Goes through the same fenced path as a worker: the claim makes any worker that
        picks the job up later find it ended (or fenced, if it claimed in between, in which
        case the ``done`` follows whatever it wrote), so there is still one terminal event.
        Its usage is the tokens earlier attempts streamed, as a worker's cancel at the seam.
        """
        try:
            claim = await self.claim(
                stream_id,
                worker="api:cancel",
                lease_seconds=5,
                continuation=continuation,
                only_to_end=True,
            )
        except GenerationEnded:
            return False  # a worker ran and ended it in the meantime: its result stands
        except ClaimRefused:
            return False  # a sweeper is ending it, and sees the cancel flag set before
        usage = await self.streamed_usage(stream_id, claim)
        ended = await self.end_claimed(
            stream_id, claim, lambda t: events.done("cancelled", usage, t=t)
        )
        return ended is not None

    async def streamed_usage(self, stream_id: str, claim: Claim) -> dict[str, int]:
        """The usage of a generation ended without its provider's count (a cancel at a
        continuation's seam): the tokens its earlier attempts streamed, from the log."""
        if claim.last_seq == 0:
            return events.NO_USAGE
        earlier = await earlier_attempts.read_earlier(self, stream_id, claim.last_seq)
        return earlier_attempts.streamed_usage(earlier.tokens)

    async def renew(self, stream_id: str, attempt: int, lease_seconds: float) -> tuple[bool, int]:
        """Extend ``attempt``'s lease; returns whether a client asked to cancel, and the new
        lease's end (ms, Redis's clock).

        Fenced like an append: raises ``StaleWriter`` / ``GenerationEnded`` when this attempt
        no longer owns the generation.
        """
        with store_errors(), script_refusals(stream_id):
            cancel, lease_until = await self._renew_script(
                keys=list(keys.generation_keys(stream_id)),
                args=[attempt, int(lease_seconds * 1000)],
            )
        return bool(cancel), int(lease_until)

    async def read(
        self, stream_id: str, after_seq: int, *, count: int = 512, block_ms: int | None = None
    ) -> list[Event]:
        """Events with ``seq > after_seq``, oldest first, at most ``count``.

        With ``block_ms``, waits up to that long for the first one when none is there yet
        (an empty list means the wait timed out). A log that does not exist yet (a queued
        generation) reads as empty.
        """
        with store_errors():
            reply = await self.redis.xread(
                {keys.log_key(stream_id): entry_id(after_seq)}, count=count, block=block_ms
            )
        if not reply:
            if self.archive is not None and block_ms is None:
                # Archived and let go since the reader opened it (or before): the archive
                # holds every event Redis did, under the same ids.
                with store_errors():
                    here = await self.redis.exists(keys.meta_key(stream_id))
                if not here:
                    return await self.archive.read(stream_id, after_seq, count=count)
            return []
        ((_, entries),) = reply
        return [
            Event.decode(fields[keys.EVENT_FIELD.encode()], seq_from_entry_id(entry))
            for entry, fields in entries
        ]

    async def append_batch(
        self,
        stream_id: str,
        attempt: int,
        first_seq: int,
        batch: Sequence[Event],
        lease_seconds: float,
        *,
        in_doubt: bool = False,
    ) -> tuple[int, bool]:
        """Append ``batch`` as ``attempt`` at ``first_seq``, in one fenced, idempotent script
        call; returns the last sequence number and whether a client asked to cancel. Use a
        ``LogWriter`` (``writer``), which keeps the attempt and the position for you, and
        knows when an earlier batch at ``first_seq`` is ``in_doubt``."""
        args = append_args(
            batch,
            attempt=attempt,
            first_seq=first_seq,
            now=now_ms(),
            lease_ms=int(lease_seconds * 1000),
            retention_seconds=self.retention_seconds,
            in_doubt=in_doubt,
        )
        with store_errors(), script_refusals(stream_id, expected=first_seq):
            if self.replica_wait.enabled:
                last, cancel = await self._append_and_wait(stream_id, args)
            else:
                last, cancel = await self._append_script(
                    keys=self._append_keys(stream_id), args=args
                )
        return int(last), bool(cancel)

    def _append_keys(self, stream_id: str) -> list[str]:
        """The append script's KEYS: on a cluster, also the channel it pulses (the reader
        hubs there learn of new events from it, ``api.cluster_tail``)."""
        stream_keys = list(keys.generation_keys(stream_id))
        if self.on_cluster:
            stream_keys.append(keys.pulse_channel(stream_id))
        return stream_keys

    async def _append_and_wait(self, stream_id: str, args: list[Any]) -> Any:
        """The append script, then ``WAIT`` for the replicas on the same connection (one
        pipeline, one round trip); the script's reply. A shortfall is reported, never
        raised (``broker.replica_wait`` says why)."""
        stream_keys = self._append_keys(stream_id)
        wait = self.replica_wait
        # ``WAIT`` names no key: on a cluster it is sent to the generation's node, which a
        # pipeline reaches through one connection, the one the script goes on.
        wait_options: dict[str, Any] = {}
        if self.on_cluster:
            wait_options["target_nodes"] = self.redis.get_node_from_key(stream_keys[0])  # type: ignore[union-attr]
        # By its sha, then by its text on a node that lacks it (``broker.store_scripts``).
        for call, script in (("EVALSHA", self._append_script.sha), ("EVAL", scripts.APPEND)):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.execute_command(call, script, len(stream_keys), *stream_keys, *args)
                pipe.execute_command("WAIT", wait.replicas, wait.timeout_ms, **wait_options)
                reply, acknowledged = await pipe.execute(raise_on_error=False)
            if not isinstance(reply, NoScriptError):
                break
        if isinstance(reply, Exception):
            raise reply  # a refusal: ``script_refusals`` names it
        self._shortfalls.note(stream_id, acknowledged)
        return reply


def _text(value: bytes | str) -> str:
    """A script's string reply, as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
