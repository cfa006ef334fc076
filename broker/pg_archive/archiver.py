"""The archiver: copies finished generations to PostgreSQL, then lets Redis forget them.

Every generation that ends is put in a due set in Redis (``keys.ARCHIVE_DUE_KEY``, in the same
step that takes it out of the lease index: ``GenerationLog.ended``), due at once. A pass takes
the entries that are due (``scripts.TAKE_ARCHIVE_DUE``: each one is held for ``CLAIM_SECONDS``
by the taker, so two archivers never work on one at once, and one that dies leaves it due
again then) and for each:

1. not copied yet: read it whole in one step (``GenerationLog.snapshot``), copy it in one
   transaction (``ArchiveStore.store``, idempotent), and only once that committed record it
   in Redis (``archived_at_ms``) and make it due again ``BROKER_ARCHIVE_AFTER_SECONDS`` on;
2. copied and due again: copy its meta hash once more (counters moved since), then delete its
   keys, unless something changed in between (``scripts.DROP_ARCHIVED``: then the next pass
   tries again); then take it out of the due set and the listing indexes.

So nothing is deleted from Redis before a committed copy holds all of it, and a copy
repeated (a crash after the commit, before the record; two takers after a claim lapsed) stores
nothing twice. PostgreSQL away: the step fails, the entry stays due and is taken again
``RETRY_SECONDS`` later, so the archive catches up when it is back (Redis keeps the generations
meanwhile: their retention is the limit, ``BROKER_RETENTION_SECONDS``).

Where it runs: a loop in every worker process (and ``streambroker dev``). Workers already run
background loops, scale with the load that makes the generations, and keep the api processes
free for readers; the due set spreads the work across however many there are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from broker import metrics, structured_logs
from broker.errors import ArchiveRefused, StoreUnavailable
from broker.generation_log import GenerationLog
from broker.keys import MetaField
from broker.pg_archive.store import ArchiveStore, Snapshot
from broker.state import Status, now_ms

logger = logging.getLogger("streambroker.archive")

#: Generations one pass takes.
BATCH = 20
#: How long a taken entry is the taker's: a copy must be done by then, or another archiver
#: takes it (and copies it again, harmlessly).
CLAIM_SECONDS = 60
#: How soon a generation whose step failed (PostgreSQL away) is tried again.
RETRY_SECONDS = 5
#: How often the archive's own retention runs, when it has one.
RETENTION_EVERY_SECONDS = 60.0


@dataclass
class ArchivePass:
    """What one pass did."""

    copied: int = 0
    dropped: int = 0
    failed: int = 0


class Archiver:
    def __init__(
        self,
        log: GenerationLog,
        store: ArchiveStore,
        *,
        after_seconds: int,
        retention_seconds: int = 0,
    ) -> None:
        self.log = log
        self.store = store
        self.after_ms = after_seconds * 1000
        self.retention_seconds = retention_seconds
        self._retention_due = 0.0

    async def archive_once(self, *, now: int | None = None) -> ArchivePass:
        """One pass over the due entries (``now``, ms, stands in for Redis's clock in
        tests)."""
        done = ArchivePass()
        ids = await self.log.take_archive_due(limit=BATCH, claim_ms=CLAIM_SECONDS * 1000, now=now)
        for position, stream_id in enumerate(ids):
            try:
                await self._one(stream_id, done)
            except StoreUnavailable as exc:
                # PostgreSQL or Redis away: what is in Redis is untouched, and this entry and
                # the rest of the pass's stay due, tried again soon (or, if Redis is away
                # too, once their claim lapses), without reading them for nothing meanwhile.
                done.failed += 1
                metrics.ARCHIVE_FAILURES.inc()
                logger.warning(
                    "generation %s: not archived this time (%s); trying again in %d s",
                    stream_id,
                    exc,
                    RETRY_SECONDS,
                    extra={"stream_id": stream_id},
                )
                with contextlib.suppress(StoreUnavailable):
                    retry_at = now_ms() + RETRY_SECONDS * 1000
                    for later in ids[position:]:
                        await self.log.archive_due_at(later, retry_at)
                break
            except ArchiveRefused as exc:
                # Data PostgreSQL cannot hold (a NUL in a text field of an imported stream):
                # trying again cannot help. It stays in Redis until its retention.
                done.failed += 1
                metrics.ARCHIVE_FAILURES.inc()
                logger.error(
                    "generation %s: the archive refuses it (%s); it stays in Redis until its "
                    "retention",
                    stream_id,
                    exc,
                    extra={"stream_id": stream_id},
                )
                await self.log.archive_forget(stream_id)
        await self._report_lag()
        await self._apply_retention()
        return done

    async def _one(self, stream_id: str, done: ArchivePass) -> None:
        meta = await self.log.stored_meta(stream_id)
        if meta is None:
            # Let go already (an earlier pass, or Redis's own retention), or an import whose
            # commit did not happen: nothing to do here.
            await self.log.archive_forget(stream_id)
            return
        status = Status(meta[MetaField.STATUS.encode()].decode())
        if not status.terminal:
            # Only an end puts it here (an import: just before its commit); one that has not
            # ended is not the archiver's until its own end puts it back.
            await self.log.archive_forget(stream_id)
            return
        archived_at = meta.get(MetaField.ARCHIVED_AT_MS.encode())
        if archived_at is None:
            snapshot = await self.log.snapshot(stream_id)
            if snapshot is None:
                await self.log.archive_forget(stream_id)
                return
            await self._copy(snapshot)
            done.copied += 1
            return
        if self.after_ms and int(archived_at) + self.after_ms > now_ms():
            await self.log.archive_due_at(stream_id, int(archived_at) + self.after_ms)
            return
        await self._drop(stream_id, meta, done)

    async def _copy(self, snapshot: Snapshot) -> None:
        stream_id = snapshot.stream_id
        if len(snapshot.events) != snapshot.last_seq:
            # Redis lost events of it (a failover): copy what there is, as readers read it.
            logger.warning(
                "generation %s: archiving %d events of %d",
                stream_id,
                len(snapshot.events),
                snapshot.last_seq,
                extra={"stream_id": stream_id},
            )
        started = time.monotonic()
        await self.store.store(snapshot)
        at = now_ms()
        if await self.log.mark_archived(stream_id, at):
            await self.log.archive_copied(stream_id, at + self.after_ms)
        metrics.ARCHIVED.labels("copied").inc()
        structured_logs.step(
            "archived",
            stream_id,
            events=len(snapshot.events),
            copy_ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _drop(self, stream_id: str, meta: dict[bytes, bytes], done: ArchivePass) -> None:
        """Let Redis forget an archived generation: its counters copied once more first
        (they may have moved since the copy). One the archive no longer holds (its
        retention deleted it meanwhile) is copied whole again before its keys go."""
        if not await self.store.refresh(stream_id, meta):
            snapshot = await self.log.snapshot(stream_id)
            if snapshot is None:
                await self.log.archive_forget(stream_id)
                return
            await self.store.store(snapshot)
            meta = snapshot.meta
        outcome = await self.log.drop_archived(stream_id, meta)
        if outcome == "changed":
            await self.log.archive_due_at(stream_id, now_ms())  # copy its counters again
            return
        tenant = meta.get(MetaField.TENANT.encode(), b"").decode()
        await self.log.archive_done(stream_id, tenant)
        if outcome == "dropped":
            done.dropped += 1
            metrics.ARCHIVED.labels("dropped").inc()
            structured_logs.step("archive_dropped", stream_id, tenant=tenant or None)

    async def _report_lag(self) -> None:
        oldest = await self.log.oldest_not_archived()
        lag = 0.0 if oldest is None else max(0.0, (now_ms() - oldest) / 1000)
        metrics.ARCHIVE_LAG.set(lag)

    async def _apply_retention(self) -> None:
        if not self.retention_seconds or time.monotonic() < self._retention_due:
            return
        self._retention_due = time.monotonic() + RETENTION_EVERY_SECONDS
        deleted = await self.store.delete_archived_before(self.retention_seconds)
        if deleted:
            metrics.ARCHIVED.labels("expired").inc(deleted)
            logger.info("archive retention: deleted %d generations", deleted)

    async def run(self, interval: float) -> None:
        """A pass every ``interval`` seconds (at once again while passes find a full batch)
        until cancelled; trouble only skips a pass."""
        while True:
            busy = False
            try:
                done = await self.archive_once()
                busy = done.copied + done.dropped >= BATCH
            except StoreUnavailable as exc:
                logger.warning("archive pass skipped: %s", exc)
            except Exception:
                logger.exception("archive pass failed")
            if not busy:
                await asyncio.sleep(interval)
