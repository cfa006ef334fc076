"""Export and import of one generation as JSON lines: a stream moved from one Redis to another
is indistinguishable to readers (same events, times, text and state; the same id too, unless
auth gives it a new one, below).

The format, and what an import accepts, are ``broker.archive_format``'s.

Ids. Without auth (one trust domain) the stream keeps its id, and an id in use here is
refused (``AlreadyExists``): an import never changes what readers of an existing id saw.
With auth on, every import gets a new id from the broker (``new_stream_id`` at the stream's
creation time, so it sorts the same; the ``metadata`` event names it too), the file's id is
kept in the state as ``imported_from``, and the stream belongs to the importing key's
tenant whatever the file says. So whether another tenant has the file's id changes nothing
in the answer (ids cannot be probed), and nobody can plant a stream in another's listing.

How. A file (the api takes up to 64 MiB) is read, checked and written a line at a time, never
held whole: events go in batches to staging keys beside the generation's own
(``keys.import_keys``, a short expiry renewed per batch), the event loop gets a turn every
few milliseconds, and one script (``scripts.COMMIT_IMPORT``) renames them into place with the
meta hash, after the listing index entries are written (``_Staging.commit`` says why in that
order). Readers see the whole stream or nothing; a refused, abandoned or interrupted import
leaves at most staging keys that soon expire, and index entries that name no stream, which
listings skip and forget. Imported keys get the importing broker's retention. All of it
works alike on one Redis and on a Redis Cluster.

Store-local meta fields (``keys.STORE_LOCAL_FIELDS``: the store epoch) describe the Redis a
stream was in, not the stream: export leaves them out, import drops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from typing import Any

from redis import exceptions as redis_errors

from broker import keys, scripts
from broker.archive_format import FORMAT, VERSION, AlreadyExists, ArchiveError, Checker, read_header
from broker.errors import StoreUnavailable
from broker.events import Event, EventType, entry_id
from broker.generation_log import GenerationLog
from broker.keys import MetaField
from broker.log_errors import store_errors
from broker.state import new_stream_id
from broker.store_scripts import StoreScript

#: Events read from the log per round trip while exporting.
EXPORT_BATCH = 1000
#: Events (or bytes of them, whichever comes first) staged per round trip while importing.
IMPORT_BATCH = 256
IMPORT_BATCH_BYTES = 1 << 20
#: How long after its commit an import is due for the PostgreSQL archive (its entry is made
#: just before the commit: ``_Staging.commit``).
IMPORT_ARCHIVE_DELAY_MS = 60_000
#: Longest an import parses before it lets the event loop run other requests.
YIELD_SECONDS = 0.005


class ImportInterrupted(Exception):
    """The staged events expired before the import finished (an upload slower than
    ``keys.IMPORT_STAGING_SECONDS`` per batch, or Redis evicted them); nothing was imported."""


async def export_lines(log: GenerationLog, stream_id: str) -> AsyncIterator[str]:
    """The stream as JSON lines (each ending with a newline), header first."""
    raw, text = await log.get_raw(stream_id)
    fields = {
        name: v.decode()
        for k, v in raw.items()
        if (name := k.decode()) not in keys.STORE_LOCAL_FIELDS
    }
    header = {
        "format": FORMAT,
        "version": VERSION,
        "id": stream_id,
        "meta": fields,
        "text": (text or b"").decode(),
    }
    yield _line(header)
    last = int(fields.get(MetaField.LAST_SEQ, "0"))
    after = 0
    while after < last:
        events = await log.read(stream_id, after, count=EXPORT_BATCH)
        if not events:
            break
        for event in events:
            yield _line(
                {"id": event.seq, "event": event.type.value, "t": event.t, "data": event.data}
            )
        after = events[-1].seq


def _line(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------- the import


async def split_lines(chunks: AsyncIterable[bytes]) -> AsyncGenerator[str, None]:
    """The lines of a body that comes in chunks, as text. Only ``\\n`` ends a line (and a
    ``\\r`` before it goes): export writes U+2028 and the like raw inside JSON strings."""
    pending: list[bytes] = []
    number = 0
    async for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pending.append(chunk[start:end])
            start = end + 1
            number += 1
            yield _decode(b"".join(pending), number)
            pending.clear()
        if start < len(chunk):
            pending.append(chunk[start:])
    if pending:
        yield _decode(b"".join(pending), number + 1)


def _decode(line: bytes, number: int) -> str:
    try:
        return line.decode("utf-8").removesuffix("\r")
    except UnicodeDecodeError:
        raise ArchiveError(f"line {number}: not UTF-8 text") from None


async def import_lines(
    log: GenerationLog, lines: AsyncIterable[str], *, tenant: str | None = None
) -> str:
    """Check and write the stream of a file's lines (``split_lines``); returns its id here.

    ``tenant`` (auth on): the stream gets a new id and becomes the importer's (the module
    docstring says why). Without it the file's id is kept, and ``AlreadyExists`` when it is
    taken. ``ArchiveError`` for a file that is not importable; ``ImportInterrupted`` when
    the staged events expired first. Either way, and whatever else interrupts it, nothing
    is imported.
    """
    async with contextlib.aclosing(_numbered(lines)) as numbered:
        return await _import(log, numbered, tenant)


async def _import(
    log: GenerationLog, numbered: AsyncIterator[tuple[int, str]], tenant: str | None
) -> str:
    first = await anext(numbered, None)
    if first is None:
        raise ArchiveError("the file is empty")
    header = read_header(first[1], first[0])
    del first  # the header's line can be most of the file
    checker = Checker(header)
    stream_id = header.stream_id
    # What described the store it came from (an epoch of that store's) is not this one's.
    meta = {k: v for k, v in header.meta.items() if k not in keys.STORE_LOCAL_FIELDS}
    if tenant is not None:
        stream_id = new_stream_id(header.state.created_at_ms)
        meta = {
            **meta,
            MetaField.ID: stream_id,
            MetaField.TENANT: tenant,
            MetaField.IMPORTED_FROM: header.stream_id,
        }
    elif await _exists(log, stream_id):
        raise AlreadyExists(f"a stream with id {stream_id} exists here already")
    staging = _Staging(log, stream_id)
    try:
        await staging.begin(header.text)
        batch: list[Event] = []
        size = 0
        turn = time.monotonic()
        async for number, row in numbered:
            event = checker.add(row, number)
            if event.type is EventType.METADATA and stream_id != header.stream_id:
                event = Event(event.type, {**event.data, "id": stream_id}, event.t, event.seq)
            batch.append(event)
            size += len(row)
            if len(batch) >= IMPORT_BATCH or size >= IMPORT_BATCH_BYTES:
                await staging.add(batch)  # a round trip: other requests run meanwhile
                batch, size, turn = [], 0, time.monotonic()
            elif time.monotonic() - turn >= YIELD_SECONDS:
                await asyncio.sleep(0)
                turn = time.monotonic()
        checker.finish()
        await staging.add(batch)
        await staging.commit(meta)
    except BaseException:
        with contextlib.suppress(Exception):  # they expire soon anyway
            await staging.discard()
        raise
    return stream_id


async def _numbered(lines: AsyncIterable[str]) -> AsyncGenerator[tuple[int, str], None]:
    """``(line number, line)`` of the lines that are not blank."""
    number = 0
    async for line in lines:
        number += 1
        if line.strip():
            yield number, line


async def _exists(log: GenerationLog, stream_id: str) -> bool:
    """Redis holds the id, or the PostgreSQL archive does."""
    meta_key, log_key, _ = keys.generation_keys(stream_id)
    with store_errors():
        if await log.redis.exists(meta_key, log_key):
            return True
    return log.archive is not None and await log.archive.holds(stream_id)


class _Staging:
    """The keys one import writes before it renames them into place, and those steps."""

    def __init__(self, log: GenerationLog, stream_id: str) -> None:
        self.log = log
        self.stream_id = stream_id
        self.log_key, self.text_key, self.done_key = keys.import_keys(
            stream_id, secrets.token_hex(8)
        )
        self.count = 0

    async def begin(self, text: str) -> None:
        with store_errors():
            await self.log.redis.set(self.text_key, text, ex=keys.IMPORT_STAGING_SECONDS)

    async def add(self, batch: list[Event]) -> None:
        """Stage events, renewing the staging keys' expiry; checks that none expired."""
        if not batch:
            return
        with store_errors():
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for event in batch:
                    pipe.xadd(
                        self.log_key, {keys.EVENT_FIELD: event.encode()}, id=entry_id(event.seq)
                    )
                pipe.expire(self.log_key, keys.IMPORT_STAGING_SECONDS)
                pipe.expire(self.text_key, keys.IMPORT_STAGING_SECONDS)
                pipe.xlen(self.log_key)
                *_, text_kept, length = await pipe.execute()
        self.count += len(batch)
        if not text_kept or length != self.count:
            raise ImportInterrupted(
                f"the import's staged events expired ({length} of {self.count})"
            )

    async def commit(self, meta: dict[str, str]) -> None:
        """Put the stream in place: readers see the whole stream or nothing.

        Its record (the generation's slot) and its listing index entries (the control slot,
        ``keys``) cannot change in one step on a Redis Cluster, so they go as
        ``GenerationLog.create`` writes them there, on one Redis too: the index first, then
        the record in one script. A crash between leaves an entry that names no stream,
        which listings skip and forget, never a stream that no listing shows.
        """
        created = int(meta[MetaField.CREATED_AT_MS])
        indexes = keys.index_keys(meta.get(MetaField.TENANT, ""))
        # NX: an entry there already may be a concurrent importer's of the same id, which
        # keeps its score unless this import is the one that lands.
        await self._index(indexes, created, only_new=True)
        if self.log.archive is not None:
            # Finished from the start: due for the PostgreSQL archive, as a generation that
            # ends here. Before the commit, so that no crash after it leaves the stream
            # unarchived; a little later, so that the archiver finds it in place (one that
            # finds no stream, the commit having failed, lets the entry go).
            await self.log.ended(self.stream_id, due_in_ms=IMPORT_ARCHIVE_DELAY_MS)
        try:
            await self._place(meta)
        except ImportInterrupted:
            # Not when the id exists now: the entry is then the creator's that got in first.
            with contextlib.suppress(StoreUnavailable):  # listings forget it anyway
                if not await _exists(self.log, self.stream_id):
                    await self._unindex(indexes)
            raise
        # Listings forget an entry without a record once its score is a few seconds old
        # (``RECORD_PENDING_MS``), and an import's score is its creation time, long past: one
        # that read the index before the record was in place dropped the entry.
        await self._index(indexes, created)

    async def _place(self, meta: dict[str, str]) -> None:
        """The record's part (``scripts.COMMIT_IMPORT``), its refusals as exceptions."""
        script = StoreScript(self.log.redis, scripts.COMMIT_IMPORT)
        fields = [item for pair in meta.items() for item in pair]
        try:
            with store_errors():
                await script(
                    keys=[
                        *keys.generation_keys(self.stream_id),
                        self.log_key,
                        self.text_key,
                        self.done_key,
                    ],
                    args=[
                        self.log.retention_seconds,
                        self.count,
                        keys.IMPORT_STAGING_SECONDS,
                        *fields,
                    ],
                )
        except redis_errors.ResponseError as exc:
            code = str(exc).partition(" ")[0]
            if code == "EXISTS":
                raise AlreadyExists(
                    f"a stream with id {self.stream_id} exists here already"
                ) from None
            if code == "EXPIRED":
                raise ImportInterrupted("the import's staged events expired") from None
            raise

    async def _index(
        self, indexes: tuple[str, ...], created: int, *, only_new: bool = False
    ) -> None:
        with store_errors():
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for index in indexes:
                    pipe.zadd(index, {self.stream_id: created}, nx=only_new)
                await pipe.execute()

    async def _unindex(self, indexes: tuple[str, ...]) -> None:
        with store_errors():
            async with self.log.redis.pipeline(transaction=False) as pipe:
                for index in indexes:
                    pipe.zrem(index, self.stream_id)
                await pipe.execute()

    async def discard(self) -> None:
        with store_errors():
            await self.log.redis.delete(self.log_key, self.text_key)
