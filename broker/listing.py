"""Listing recorded generations, newest first, a page at a time.

The index is a sorted set of stream ids scored by creation time (ms): one of all generations,
and one per tenant (``keys.listing_index_key``). A page is read newest first; its cursor is the
``(score, id)`` of the last entry looked at, so a later page starts exactly after it whatever
was created meanwhile (new streams are newer than every cursor: they never shift pages).
Entries with the same score are ordered by id, as Redis orders equal scores.

Filters (status, model, metadata values, a creation time range) are applied to the meta
hashes of the entries read, so a page may hold fewer than ``limit`` streams; reading stops
after ``SCAN_LIMIT`` entries and the cursor says where to go on. Entries whose generation
expired are dropped from the index on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker import keys
from broker.creation import RECORD_PENDING_MS
from broker.generation_log import GenerationLog
from broker.log_errors import store_errors
from broker.numbers import InvalidNumber, parse_int
from broker.state import GenerationState, Status, is_stream_id, now_ms

if TYPE_CHECKING:
    from broker.pg_archive.store import ArchiveStore

#: Index entries read per round trip.
BATCH = 100
#: Most index entries one page looks at, whatever the filters keep.
SCAN_LIMIT = 2_000


class InvalidCursor(ValueError):
    pass


@dataclass(frozen=True)
class Cursor:
    score: int
    stream_id: str

    def encode(self) -> str:
        return f"{self.score}.{self.stream_id}"

    @classmethod
    def decode(cls, raw: str) -> Cursor:
        """``<score>.<stream id>`` as ``encode`` wrote it: the score in ASCII digits
        (``broker.numbers``), at most 15 of them (ms since 1970 need 13)."""
        score_text, _, stream_id = raw.partition(".")
        try:
            score = parse_int(score_text, max_digits=15)
        except InvalidNumber:
            raise InvalidCursor("cursor: not a cursor this listing returned") from None
        if not is_stream_id(stream_id):
            raise InvalidCursor("cursor: not a cursor this listing returned")
        return cls(score, stream_id)


@dataclass(frozen=True)
class StreamFilter:
    status: Status | None = None
    model: str | None = None
    #: Every key must be in the stream's metadata with this value (compared as text).
    metadata: dict[str, str] = field(default_factory=dict)
    created_after_ms: int | None = None
    created_before_ms: int | None = None

    def matches(self, state: GenerationState) -> bool:
        if self.status is not None and state.status is not self.status:
            return False
        if self.model is not None and state.model != self.model:
            return False
        for name, wanted in self.metadata.items():
            if name not in state.metadata or _as_text(state.metadata[name]) != wanted:
                return False
        return True


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


async def list_streams(
    log: GenerationLog,
    *,
    tenant: str | None,
    limit: int,
    cursor: Cursor | None = None,
    where: StreamFilter | None = None,
) -> tuple[list[GenerationState], Cursor | None]:
    """Up to ``limit`` streams, newest first, and the cursor of the next page (None: no
    more): those in Redis and, with an archive, those in it, in one order."""
    where = where or StreamFilter()
    hot = await _list_hot(log, tenant=tenant, limit=limit, cursor=cursor, where=where)
    if log.archive is None:
        return hot
    cold = await _list_archived(log.archive, tenant=tenant, limit=limit, cursor=cursor, where=where)
    return _merged(hot, cold, limit)


Page = tuple[list[GenerationState], Cursor | None]


def _key(state: GenerationState) -> tuple[int, str]:
    return state.created_at_ms, state.id


def _merged(hot: Page, cold: Page, limit: int) -> Page:
    """One page of two, each newest first and complete down to its cursor (None: to the
    end). The merged page is complete only down to the newer of the two cursors: what lies
    beyond it in the other is left to the next page, which starts there. A generation in
    both (archived, not let go yet) is listed once, as Redis has it."""
    bounds = [(c.score, c.stream_id) for _, c in (hot, cold) if c is not None]
    bound = max(bounds) if bounds else None
    seen: set[str] = set()
    states = []
    for state in sorted([*hot[0], *cold[0]], key=_key, reverse=True):
        if state.id in seen or (bound is not None and _key(state) < bound):
            continue
        seen.add(state.id)
        states.append(state)
    if len(states) > limit:
        states = states[:limit]
        last = states[-1]
        return states, Cursor(last.created_at_ms, last.id)
    return states, None if bound is None else Cursor(*bound)


async def _list_archived(
    archive: ArchiveStore,
    *,
    tenant: str | None,
    limit: int,
    cursor: Cursor | None,
    where: StreamFilter,
) -> Page:
    """``_list_hot``'s page, from the PostgreSQL archive."""
    before = None if cursor is None else (cursor.score, cursor.stream_id)
    created_before = where.created_before_ms
    found: list[GenerationState] = []
    scanned = 0
    while scanned < SCAN_LIMIT:
        rows = await archive.page(
            tenant=tenant,
            limit=BATCH,
            before=before,
            created_after_ms=where.created_after_ms,
            created_before_ms=created_before,
        )
        for row in rows:
            scanned += 1
            before = (row.created_at_ms, row.stream_id)
            state = GenerationState.from_hash(row.meta)
            if where.matches(state):
                found.append(state)
                if len(found) == limit:
                    return found, Cursor(*before)
        if len(rows) < BATCH:
            return found, None
    assert before is not None
    return found, Cursor(*before)


async def _list_hot(
    log: GenerationLog,
    *,
    tenant: str | None,
    limit: int,
    cursor: Cursor | None,
    where: StreamFilter,
) -> Page:
    """A page of the generations Redis holds."""
    key = keys.listing_index_key(tenant)
    newest, oldest, offset = await _page_range(log, key, cursor, where)
    found: list[GenerationState] = []
    last: Cursor | None = None
    scanned = 0
    while scanned < SCAN_LIMIT:
        with store_errors():
            entries = await log.redis.zrevrangebyscore(
                key, newest, oldest, start=offset, num=BATCH, withscores=True
            )
        if not entries:
            return found, None
        offset += len(entries)
        ids = [member.decode() for member, _ in entries]
        hashes = await log.meta_hashes(ids)
        gone = []
        scores = [int(score) for _, score in entries]
        for stream_id, score, raw in zip(ids, scores, hashes, strict=True):
            scanned += 1
            last = Cursor(score, stream_id)
            if not raw:
                if score < now_ms() - RECORD_PENDING_MS:
                    gone.append(stream_id)  # else its record may be on its way (a cluster)
                continue
            state = GenerationState.from_hash(raw)
            if where.matches(state):
                found.append(state)
                if len(found) == limit:
                    await _forget(log, key, gone)
                    return found, last
        await _forget(log, key, gone)
        if len(entries) < BATCH:
            return found, None
    return found, last


async def _page_range(
    log: GenerationLog, key: str, cursor: Cursor | None, where: StreamFilter
) -> tuple[int | str, int | str, int]:
    """Where the page lies in the index: ``(newest score, oldest score, offset)`` for
    ``ZREVRANGEBYSCORE``, the offset skipping the entries a previous page already covered."""
    newest: int | str = "+inf"
    offset = 0
    if cursor is not None:
        newest = cursor.score
        with store_errors():
            same = await log.redis.zrangebyscore(key, cursor.score, cursor.score)
        # Equal scores come in descending id order: skip those at or after the cursor.
        offset = sum(1 for member in same if member.decode() >= cursor.stream_id)
    before = where.created_before_ms
    if before is not None and (cursor is None or before <= cursor.score):
        newest, offset = f"({before}", 0  # the range ends before the cursor does
    oldest: int | str = where.created_after_ms if where.created_after_ms is not None else "-inf"
    return newest, oldest, offset


async def _forget(log: GenerationLog, key: str, gone: list[str]) -> None:
    """Index entries of generations that expired: they would only cost later pages."""
    if gone:
        with store_errors():
            await log.redis.zrem(key, *gone)
