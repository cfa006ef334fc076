"""Export and import of one generation as JSON lines: a stream moved from one Redis to another
is indistinguishable to readers (same ids, events, times, text and state).

The format (``streambroker.stream``, version 1), one JSON object per line:

- line 1, the header: ``{"format": "streambroker.stream", "version": 1, "id": <stream id>,
  "meta": {<every field of the meta hash, as stored: strings>}, "text": <the text so far>}``;
- then one line per event, in order: ``{"id": <seq>, "event": <type>, "t": <ms since
  created>, "data": {<payload>}}`` — the SSE frame's fields, so the file reads like the stream.

Only finished generations are imported (the last event is terminal), and never over an
existing one: an import cannot leave a writer-less stream running, or change what readers
of an existing id saw. Imported keys get the importing broker's retention.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from redis import exceptions as redis_errors

from broker import keys, strict_json
from broker.events import Event, EventType, entry_id
from broker.log import GenerationLog, store_errors
from broker.state import GenerationState, is_stream_id

FORMAT = "streambroker.stream"
VERSION = 1
#: Events read from the log per round trip while exporting.
EXPORT_BATCH = 1000


class ArchiveError(ValueError):
    """The file is not an importable stream; the message names the line and the problem."""


class AlreadyExists(ArchiveError):
    pass


async def export_lines(log: GenerationLog, stream_id: str) -> AsyncIterator[str]:
    """The stream as JSON lines (each ending with a newline), header first."""
    raw, text = await log.get_raw(stream_id)
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "id": stream_id,
        "meta": fields,
        "text": (text or b"").decode(),
    }
    yield _line(header)
    last = int(fields.get("last_seq", "0"))
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


def parse(lines: Iterable[str]) -> tuple[str, dict[str, str], str, list[Event]]:
    """Check a whole file: ``(stream id, meta, text, events)``, or ``ArchiveError``."""
    rows = [line for line in lines if line.strip()]
    if not rows:
        raise ArchiveError("the file is empty")
    header = _json(rows[0], 1)
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ArchiveError(f"line 1: not a {FORMAT} file of version {VERSION}")
    stream_id, meta, text = header.get("id"), header.get("meta"), header.get("text")
    if not isinstance(stream_id, str) or not is_stream_id(stream_id):
        raise ArchiveError("line 1: id: not a stream id")
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise ArchiveError("line 1: meta: expected an object of strings")
    if not isinstance(text, str):
        raise ArchiveError("line 1: text: expected a string")
    try:
        state = GenerationState.from_hash({k.encode(): v.encode() for k, v in meta.items()})
    except (KeyError, ValueError) as exc:
        raise ArchiveError(f"line 1: meta: not a generation's state ({exc})") from None
    if state.id != stream_id:
        raise ArchiveError("line 1: meta.id differs from id")
    events = []
    for number, row in enumerate(rows[1:], start=2):
        body = _json(row, number)
        seq, kind, t, data = body.get("id"), body.get("event"), body.get("t"), body.get("data")
        if seq != number - 1:
            raise ArchiveError(f"line {number}: id: expected {number - 1} (ids are 1, 2, 3…)")
        if kind not in {e.value for e in EventType}:
            raise ArchiveError(f"line {number}: event: {kind!r} is not an event type")
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ArchiveError(f"line {number}: t: expected a whole number of ms")
        if not isinstance(data, dict):
            raise ArchiveError(f"line {number}: data: expected an object")
        events.append(Event(EventType(kind), data, t=t, seq=seq))
    if not events or not events[-1].terminal:
        raise ArchiveError("only finished streams are imported: the last event is not terminal")
    if any(e.terminal for e in events[:-1]):
        raise ArchiveError("an event follows the terminal event")
    if state.last_seq != len(events) or not state.status.terminal:
        raise ArchiveError("line 1: meta: status and last_seq do not match the events")
    return stream_id, meta, text, events


def _json(row: str, number: int) -> dict[str, Any]:
    try:
        value = strict_json.loads(row)
    except ValueError as exc:
        raise ArchiveError(f"line {number}: not JSON the broker can store: {exc}") from None
    if not isinstance(value, dict):
        raise ArchiveError(f"line {number}: expected a JSON object")
    return value


async def import_lines(
    log: GenerationLog, lines: Iterable[str], *, tenant: str | None = None
) -> str:
    """Write the stream of a parsed file; returns its id. ``AlreadyExists`` if the id is
    taken here. One transaction: readers see the whole stream or nothing. ``tenant`` (auth
    on): the stream becomes the importer's, whatever the file says, so nobody can plant a
    stream in another tenant's list."""
    stream_id, meta, text, events = parse(lines)
    if tenant is not None:
        meta = {**meta, "tenant": tenant}
    meta_key, log_key, text_key = keys.generation_keys(stream_id)
    ttl = log.retention_seconds
    created = int(meta["created_at_ms"])
    tenant = meta.get("tenant", "")
    with store_errors():
        async with log.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(meta_key, log_key)
                if await pipe.exists(meta_key, log_key):
                    raise AlreadyExists(f"a stream with id {stream_id} exists here already")
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.hset(meta_key, mapping=meta)
                for event in events:
                    pipe.xadd(log_key, {keys.EVENT_FIELD: event.encode()}, id=entry_id(event.seq))
                pipe.set(text_key, text)
                for key in (meta_key, log_key, text_key):
                    pipe.expire(key, ttl)
                pipe.zadd(keys.INDEX_KEY, {stream_id: created})
                if tenant:
                    pipe.zadd(keys.tenant_index_key(tenant), {stream_id: created})
                await pipe.execute()
            except redis_errors.WatchError:
                raise AlreadyExists(
                    f"a stream with id {stream_id} was created here meanwhile"
                ) from None
    return stream_id
