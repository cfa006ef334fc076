"""The generation log: creating generations, fenced appends, reading and tailing events.

This is the only module that knows how a generation is laid out in Redis (with ``keys`` and
``scripts``). Writers go through ``LogWriter``, which owns one attempt's fencing token and the
next sequence number; every append is one script call that checks both before it ``XADD``s,
so a writer that lost its claim can never append again, and a retried append cannot duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from broker import events, jobs, keys, metrics, scripts
from broker.errors import (
    ClaimRefused,
    GenerationEnded,
    GenerationNotFound,
    SequenceConflict,
    StaleWriter,
    StoreUnavailable,
)
from broker.events import Event, EventType, entry_id, seq_from_entry_id
from broker.state import GenerationState, Status, now_ms


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Map redis-py's connection failures to ``StoreUnavailable`` at the boundary.

    A ``ReadOnlyError`` counts as unavailable too: it is what a master that was just demoted
    to a replica answers (a failover), and like a dropped connection it passes once the
    client reaches the new master. ``BusyLoadingError`` (a restarting Redis reading its
    AOF) is a ``ConnectionError`` in redis-py.
    """
    try:
        yield
    except (
        redis_errors.ConnectionError,
        redis_errors.TimeoutError,
        redis_errors.ReadOnlyError,
    ) as exc:
        raise StoreUnavailable(f"Redis is unreachable: {exc}") from exc


def final_status(event: Event) -> Status | None:
    """The status a terminal event gives its generation; None for any other event."""
    if event.type is EventType.ERROR:
        return Status.FAILED
    if event.type is EventType.DONE:
        if event.data.get("finish_reason") == "cancelled":
            return Status.CANCELLED
        return Status.COMPLETED
    return None


def _final_fields(event: Event) -> list[str]:
    """Meta-hash fields recorded with the terminal event (the result a state read returns)."""
    if event.type is EventType.DONE:
        return [
            "finish_reason",
            str(event.data.get("finish_reason") or ""),
            "usage",
            json.dumps(event.data.get("usage"), separators=(",", ":")),
        ]
    return ["error", json.dumps(event.data, separators=(",", ":"))]


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


class GenerationLog:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        retention_seconds: int,
        queue_timeout_seconds: int = jobs.DEFAULT_QUEUE_TIMEOUT_SECONDS,
    ) -> None:
        self.redis = redis
        self.retention_seconds = retention_seconds
        #: How long a generation may stay queued: its arq job expires then, and the sweeper
        #: ends the generation (``queue_timeout``) instead of leaving it queued for good.
        self.queue_timeout_seconds = queue_timeout_seconds
        self._claim_script = redis.register_script(scripts.CLAIM)
        self._append_script = redis.register_script(scripts.APPEND)
        self._cancel_script = redis.register_script(scripts.REQUEST_CANCEL)
        self._renew_script = redis.register_script(scripts.RENEW)
        self._take_over_script = redis.register_script(scripts.TAKE_OVER)
        self._open_watch_script = redis.register_script(scripts.OPEN_WATCH)
        self._lapsed_script = redis.register_script(scripts.LAPSED)
        self._index_lease_script = redis.register_script(scripts.INDEX_LEASE)

    async def create(self, state: GenerationState) -> None:
        """Record a new generation, index it for listings and queue its job: one transaction,
        so nothing is ever recorded without its job or queued without its record.

        The generation also enters the lease index, due when its job expires unstarted: if
        no worker ever claims it, a sweeper ends it then (every generation ends).
        """
        meta = keys.meta_key(state.id)
        queue_deadline = state.created_at_ms + self.queue_timeout_seconds * 1000
        with store_errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(meta, mapping={**state.to_hash(), "lease_until_ms": queue_deadline})
                pipe.expire(meta, self.retention_seconds)
                pipe.zadd(keys.LEASES_KEY, {state.id: queue_deadline})
                # Entries older than the retention point at expired keys: keep the index bounded.
                horizon = state.created_at_ms - self.retention_seconds * 1000
                indexes = [keys.INDEX_KEY]
                if state.tenant:
                    indexes.append(keys.tenant_index_key(state.tenant))
                for index in indexes:
                    pipe.zadd(index, {state.id: state.created_at_ms})
                    pipe.zremrangebyscore(index, "-inf", horizon)
                jobs.queue_generation(
                    pipe,
                    state.id,
                    state.created_at_ms,
                    expires_ms=self.queue_timeout_seconds * 1000,
                )
                await pipe.execute()

    async def get(self, stream_id: str) -> GenerationState:
        raw, text = await self.get_raw(stream_id)
        return GenerationState.from_hash(raw, text)

    async def get_raw(self, stream_id: str) -> tuple[dict[bytes, bytes], bytes | None]:
        """The meta hash as stored and the text, read together; ``GenerationNotFound``."""
        meta, _, text = keys.generation_keys(stream_id)
        with store_errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(meta)
                pipe.get(text)
                raw, body = await pipe.execute()
        if not raw:
            raise GenerationNotFound(stream_id)
        return raw, body

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
        if not reply:
            raise GenerationNotFound(stream_id)
        flat, text = reply
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        return GenerationState.from_hash(raw, text)

    async def claim(self, stream_id: str, *, worker: str, lease_seconds: float) -> Claim:
        """Start a new attempt: every writer of an earlier attempt is fenced from now on.

        The generation is put in the lease index, due a lease from now, *before* the claim:
        whatever happens after (the claim's reply is lost, this process dies), a sweeper
        finds it and ends it if no writer renews it. (A separate step rather than part of
        the claim script: the index is one key for all generations, which a Redis Cluster
        keeps in another slot than the generation's own keys.) An entry left by a claim
        that did not happen is harmless: the sweeper finds the generation still queued with
        its queue deadline ahead, and puts the entry back at that deadline.
        """
        lease_ms = int(lease_seconds * 1000)
        with store_errors():
            await self._index_lease_script(keys=[keys.LEASES_KEY], args=[stream_id, lease_ms])
        with store_errors(), _refusals(stream_id):
            attempt, last_seq, cancel, _ = await self._claim_script(
                keys=list(keys.generation_keys(stream_id)), args=[worker, now_ms(), lease_ms]
            )
        return Claim(attempt=int(attempt), last_seq=int(last_seq), cancel_requested=bool(cancel))

    async def mark_lost(self, stream_id: str, first_lost: int) -> None:
        """Record that events from ``first_lost`` on were lost by the store after they were
        appended (and maybe read). Kept as the lowest such id ever seen."""
        meta = keys.meta_key(stream_id)
        with store_errors():
            known = await self.redis.hget(meta, "lost_from_seq")  # type: ignore[misc]
            if known is None or int(known) > first_lost:
                await self.redis.hset(meta, "lost_from_seq", str(first_lost))  # type: ignore[misc]

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
        one takes it. Lapsed by Redis's clock, or by ``now`` when given."""
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
        with store_errors(), _refusals(stream_id):
            status = await self._cancel_script(keys=list(keys.generation_keys(stream_id)))
        return Status(status.decode() if isinstance(status, bytes) else status)

    async def position(self, stream_id: str) -> tuple[Status, int] | None:
        """``(status, last_seq)``, or None when the generation no longer exists."""
        with store_errors():
            status, last_seq = await self.redis.hmget(  # type: ignore[misc]
                keys.meta_key(stream_id), ["status", "last_seq"]
            )
        if status is None:
            return None
        return Status(status.decode()), int(last_seq or 0)

    async def cancel_queued(self, stream_id: str) -> bool:
        """End a generation no worker has started, as ``done``/``cancelled``, right away;
        False when a worker ended it first.

        Goes through the same fenced path as a worker: the claim makes any worker that
        picks the job up later find it ended (or fenced, if it claimed in between, in which
        case the ``done`` follows whatever it wrote), so there is still one terminal event.
        """
        try:
            claim = await self.claim(stream_id, worker="api:cancel", lease_seconds=5)
        except GenerationEnded:
            return False  # a worker ran and ended it in the meantime: its result stands
        except ClaimRefused:
            return False  # a sweeper is ending it, and sees the cancel flag set before
        ended = await self.end_claimed(
            stream_id, claim, lambda t: events.done("cancelled", events.NO_USAGE, t=t)
        )
        return ended is not None

    async def renew(self, stream_id: str, attempt: int, lease_seconds: float) -> tuple[bool, int]:
        """Extend ``attempt``'s lease; returns whether a client asked to cancel, and the new
        lease's end (ms, Redis's clock).

        Fenced like an append: raises ``StaleWriter`` / ``GenerationEnded`` when this attempt
        no longer owns the generation.
        """
        with store_errors(), _refusals(stream_id):
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
    ) -> tuple[int, bool]:
        if not batch:
            raise ValueError("an append needs at least one event")
        args: list[Any] = [
            attempt,
            first_seq,
            now_ms(),
            int(lease_seconds * 1000),
            self.retention_seconds,
        ]
        final = final_status(batch[-1])
        if any(final_status(e) for e in batch[:-1]):
            raise ValueError("a terminal event must be the last of its batch")
        args.append(final.value if final else "")
        payloads = [event.encode() for event in batch]
        args.append(_batch_token(attempt, first_seq, payloads))
        args.append(len(batch))
        for event, payload in zip(batch, payloads, strict=True):
            text = event.data.get("text", "") if event.type is EventType.TOKEN else ""
            args.extend([payload, text])
        if final:
            args.extend(_final_fields(batch[-1]))
        with store_errors(), _refusals(stream_id, expected=first_seq):
            last, cancel = await self._append_script(
                keys=list(keys.generation_keys(stream_id)), args=args
            )
        return int(last), bool(cancel)


#: Back-off between retries of a writer's store call while Redis is unreachable: short at
#: first (a dropped connection is usually back at once), never long (a failover of a few
#: seconds should delay events by little more than itself).
_RETRY_FIRST_SECONDS = 0.05
_RETRY_MAX_SECONDS = 0.5

T = TypeVar("T")


class LogWriter:
    """One attempt's right to append to one generation, and its position in the log.

    Every store call a writer makes (appends, lease renewals and the cancel poll they carry,
    the lease index) rides out a Redis outage shorter than the lease: it is retried with
    bounded back-off until the lease this writer last secured would lapse, and only then
    raises ``StoreUnavailable``. Until then no sweeper can take the generation over, so
    waiting is safe; after it, giving up is right (a sweeper may already have).
    """

    def __init__(
        self, log: GenerationLog, stream_id: str, attempt: int, next_seq: int, lease_seconds: float
    ) -> None:
        self.log = log
        self.stream_id = stream_id
        self.attempt = attempt
        self.next_seq = next_seq
        self.lease_seconds = lease_seconds
        #: Set once an append reports that a client asked to cancel.
        self.cancel_requested = False
        #: Until when the lease index has this generation (ms, Redis's clock), as this writer
        #: last set it: the claim put it a lease ahead, a little before now.
        self._indexed_until_ms: int | None = None
        #: Until when (monotonic) the lease this writer last secured holds at the least.
        self._lease_holds_until = time.monotonic() + lease_seconds

    async def append(self, *batch: Event) -> list[Event]:
        """Append events in order, atomically; returns them with their sequence numbers.

        Raises ``StaleWriter`` if another attempt took over, ``GenerationEnded`` after a
        terminal event, ``SequenceConflict`` if the log moved under this writer. While Redis
        is unreachable the same batch is retried until the lease would lapse (appends are
        idempotent, so a batch whose reply was lost is not written twice); then
        ``StoreUnavailable``.
        """
        if not batch:
            return []
        last, cancel = await self._ride_out(
            lambda: self.log.append_batch(
                self.stream_id, self.attempt, self.next_seq, batch, self.lease_seconds
            ),
            extends_lease=True,
        )
        stored = [e.with_seq(self.next_seq + i) for i, e in enumerate(batch)]
        self.next_seq = last + 1
        self.cancel_requested = self.cancel_requested or cancel
        _count(batch)
        if batch[-1].terminal:
            # Ended: nothing left for a sweeper (if this is lost, a sweep finds it ended).
            with contextlib.suppress(StoreUnavailable):
                await self.log.unindex_lease(self.stream_id)
        return stored

    async def end(self, event: Event) -> list[Event]:
        """Append a terminal event on the way out, after this writer gave up on the store:
        it gets a lease's worth of retries of its own (if a sweeper took over meanwhile, the
        fence refuses it and the sweeper's end stands)."""
        self._lease_holds_until = max(
            self._lease_holds_until, time.monotonic() + self.lease_seconds
        )
        return await self.append(event)

    async def renew(self) -> None:
        """Keep the lease while the provider is quiet, and learn of a cancel or a takeover.

        The lease index is moved along every half lease, not at every renewal: it is only
        where sweepers look, and they check the lease itself before they act.
        """
        cancel, lease_until = await self._ride_out(
            lambda: self.log.renew(self.stream_id, self.attempt, self.lease_seconds),
            extends_lease=True,
        )
        if cancel:
            self.cancel_requested = True
        lease_ms = int(self.lease_seconds * 1000)
        if self._indexed_until_ms is None or lease_until - lease_ms // 2 >= self._indexed_until_ms:
            self._indexed_until_ms = lease_until
            await self._ride_out(lambda: self.log.index_lease(self.stream_id, lease_until))

    async def _ride_out(
        self, call: Callable[[], Awaitable[T]], *, extends_lease: bool = False
    ) -> T:
        """``call()``, retried while Redis is unreachable and this writer's lease holds.

        ``extends_lease``: the call renews the lease when it succeeds, from (at the earliest)
        the moment the successful try was sent."""
        delay = _RETRY_FIRST_SECONDS
        while True:
            sent = time.monotonic()
            try:
                result = await call()
            except StoreUnavailable:
                remaining = self._lease_holds_until - time.monotonic()
                if remaining <= 0:
                    raise
                # The last try comes as the lease ends, not a back-off step before it.
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
                continue
            if extends_lease:
                self._lease_holds_until = sent + self.lease_seconds
            return result


def _count(batch: Sequence[Event]) -> None:
    """Metrics of an appended batch, whoever wrote it (a worker, the sweeper, the api)."""
    tokens = sum(e.data.get("tokens", 0) for e in batch if e.type is EventType.TOKEN)
    if tokens:
        metrics.TOKENS_GENERATED.inc(tokens)
    status = final_status(batch[-1])
    if status is not None:
        metrics.STREAMS_FINISHED.labels(status.value).inc()


def _batch_token(attempt: int, first_seq: int, payloads: list[bytes]) -> str:
    """Identifies one batch of one writer, so a retry of it is recognised as already stored."""
    digest = hashlib.blake2b(digest_size=8)
    for payload in payloads:
        digest.update(len(payload).to_bytes(4, "big"))
        digest.update(payload)
    return f"{attempt}:{first_seq}:{digest.hexdigest()}"


@contextlib.contextmanager
def _refusals(stream_id: str, *, expected: int = 0) -> Iterator[None]:
    """Turn the scripts' error replies into the exception tree of ``broker.errors``."""
    try:
        yield
    except redis_errors.ResponseError as exc:
        code, _, detail = str(exc).partition(" ")
        if code == "NOGEN":
            raise GenerationNotFound(stream_id) from exc
        if code == "STALE":
            raise StaleWriter(stream_id, f"attempt {detail} owns the generation now") from exc
        if code == "ENDED":
            raise GenerationEnded(stream_id, f"the generation already ended ({detail})") from exc
        if code == "SEQ":
            raise SequenceConflict(stream_id, expected, int(detail)) from exc
        if code == "REFUSED":
            raise ClaimRefused(stream_id, detail) from exc
        raise
