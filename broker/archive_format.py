"""The export format of one generation (``streambroker.stream``, version 1), and the checks
that an imported file is one the broker itself could have written.

One JSON object per line:

- line 1, the header: ``{"format": "streambroker.stream", "version": 1, "id": <stream id>,
  "meta": {<every field of the meta hash, as stored: strings>}, "text": <the text so far>}``
  (except the store-local fields, ``keys.STORE_LOCAL_FIELDS``: accepted, but not imported);
- then one line per event, in order: ``{"id": <seq>, "event": <type>, "t": <ms since
  created>, "data": {<payload>}}`` — the SSE frame's fields, so the file reads like the stream.

An import accepts only what the broker itself could have written, checked with the models
its writes use, so that what is accepted is served like any other stream (state, listing,
events, OpenAI chunks, export) and nothing else is stored:

- the ``meta`` fields are those of a generation's state, each of its type (whole numbers in
  range, JSON objects where the state has them); ``GenerationState.from_hash`` reads them;
- each event's ``data`` is the payload the broker writes for its type (``PAYLOADS``: a
  ``token`` has ``text`` and ``tokens``, ``done`` a ``finish_reason`` and ``usage`` counts, …),
  and never ``type`` or ``t``, the event's own fields (``Event.encode`` refuses them too);
- the last event, and only it, is terminal (only finished streams are imported: an import
  cannot leave a writer-less stream running), and the meta agrees with it: the status
  (``done`` → completed, or cancelled with finish reason ``cancelled``; ``error`` → failed),
  the finish reason and usage, or the error; ``last_seq`` counts the events, and ``text`` is
  the token events' texts end to end.

Anything else is refused with ``ArchiveError``, whose message names the line and the field.
What each single value may hold (the payloads, the meta fields) is ``broker.archive_schema``'s;
this module reads the lines and makes the checks that span them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from broker import strict_json
from broker.appends import final_status
from broker.archive_schema import is_count, meta_problem, payload_problem
from broker.events import Event, EventType
from broker.keys import MetaField
from broker.state import GenerationState, is_stream_id

FORMAT = "streambroker.stream"
VERSION = 1


class ArchiveError(ValueError):
    """The file is not an importable stream; the message names the line and the problem."""


class AlreadyExists(ArchiveError):
    pass


#: The meta fields every finished generation has.
_REQUIRED = (
    MetaField.ID,
    MetaField.MODEL,
    MetaField.STATUS,
    MetaField.CREATED_AT_MS,
    MetaField.REQUEST,
    MetaField.LAST_SEQ,
    MetaField.FINISHED_AT_MS,
)
#: The fields of a header line, in the order export writes them.
_HEADER_FIELDS = ("format", "version", "id", "meta", "text")


@dataclass(frozen=True)
class Header:
    stream_id: str
    meta: dict[str, str]
    state: GenerationState
    text: str
    #: Its line in the file (1, unless blank lines come first).
    number: int


def read_header(row: str, number: int) -> Header:
    """The header on line ``number``, checked; ``ArchiveError`` when it cannot be."""
    where = f"line {number}"
    body = _header_body(row, where)
    stream_id, meta, text = body.get("id"), body.get("meta"), body.get("text")
    if not isinstance(stream_id, str) or not is_stream_id(stream_id):
        raise ArchiveError(f"{where}: id: not a stream id")
    if not isinstance(meta, dict) or not all(
        isinstance(v, str) and _is_utf8(k) and _is_utf8(v) for k, v in meta.items()
    ):
        raise ArchiveError(f"{where}: meta: expected an object of strings")
    if not isinstance(text, str) or not _is_utf8(text):
        raise ArchiveError(f"{where}: text: expected a string (without lone surrogates)")
    _check_meta(meta, stream_id, where)
    return Header(stream_id, meta, _state_of(meta, where), text, number)


def _header_body(row: str, where: str) -> dict[str, Any]:
    """The header line's object: of this format and version, with no field of another."""
    # Plain ``json.loads`` rather than ``strict_json``: the header can hold tens of MiB of
    # text, parsed while the event loop waits, and strict_json's check of what it parsed
    # (a second pass) would triple that. Every value of a header is checked instead.
    try:
        body = json.loads(row)
    except (ValueError, RecursionError) as exc:
        raise ArchiveError(f"{where}: not JSON the broker can store: {exc}") from None
    if not isinstance(body, dict):
        raise ArchiveError(f"{where}: expected a JSON object")
    version = body.get("version")
    if body.get("format") != FORMAT or not is_count(version) or version != VERSION:
        raise ArchiveError(f"{where}: not a {FORMAT} file of version {VERSION}")
    for name in body:
        if name not in _HEADER_FIELDS:
            raise ArchiveError(f"{where}: {name}: not a field of the header")
    return body


def _check_meta(meta: dict[str, str], stream_id: str, where: str) -> None:
    """Every required field is there, every field holds a value of its form, and the id is
    the header's."""
    for name in _REQUIRED:
        if name not in meta:
            raise ArchiveError(f"{where}: meta.{name}: missing")
    for name, value in meta.items():
        problem = meta_problem(name, value)
        if problem is not None:
            raise ArchiveError(f"{where}: meta.{name}: {problem}")
    if meta[MetaField.ID] != stream_id:
        raise ArchiveError(f"{where}: meta.id: differs from id")


def _state_of(meta: dict[str, str], where: str) -> GenerationState:
    """The state as every reader builds it from the hash; its API form is what they are
    served, so it must build too."""
    try:
        state = GenerationState.from_hash({k.encode(): v.encode() for k, v in meta.items()})
        json.dumps(state.to_api())
    except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise ArchiveError(f"{where}: meta: not a generation's state ({exc!r})") from None
    return state


def _is_utf8(text: str) -> bool:
    """``text`` can be stored: it holds no lone UTF-16 surrogate (``\\ud800`` in JSON)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_event(row: str, number: int, seq: int) -> Event:
    body = _json(row, number)
    where = f"line {number}"
    for name in body:
        if name not in ("id", "event", "t", "data"):
            raise ArchiveError(f"{where}: {name}: not a field of an event line")
    given, kind, t, data = body.get("id"), body.get("event"), body.get("t"), body.get("data")
    if not is_count(given) or given != seq:
        raise ArchiveError(f"{where}: id: expected {seq} (ids are 1, 2, 3…)")
    if not isinstance(kind, str) or kind not in {e.value for e in EventType}:
        raise ArchiveError(f"{where}: event: {kind!r} is not an event type")
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise ArchiveError(f"{where}: t: expected a whole number of ms")
    if not isinstance(data, dict):
        raise ArchiveError(f"{where}: data: expected an object")
    problem = payload_problem(EventType(kind), data)
    if problem is not None:
        raise ArchiveError(f"{where}: data.{problem[0]}: {problem[1]}")
    return Event(EventType(kind), data, t=t, seq=seq)


class Checker:
    """The checks that span lines, made as the events go by: it holds the header and where
    the token texts have reached in its text, never the events."""

    def __init__(self, header: Header) -> None:
        self.header = header
        self.count = 0
        #: Characters of the header's text the token events have covered so far.
        self.position = 0
        self.terminal: tuple[int, Event] | None = None

    def add(self, row: str, number: int) -> Event:
        """The event on line ``number``, checked; ``ArchiveError`` when it cannot be."""
        event = read_event(row, number, self.count + 1)
        if self.terminal is not None:
            raise ArchiveError(f"line {number}: an event follows the terminal event")
        self.count += 1
        if event.terminal:
            self.terminal = (number, event)
        elif event.type is EventType.METADATA and event.data["id"] != self.header.stream_id:
            raise ArchiveError(f"line {number}: data.id: not the stream's id")
        elif event.type is EventType.TOKEN:
            text: str = event.data["text"]
            if not self.header.text.startswith(text, self.position):
                raise ArchiveError(
                    f"line {self.header.number}: text: differs from the token texts from line "
                    f"{number} on (at character {self.position})"
                )
            self.position += len(text)
        return event

    def finish(self) -> None:
        """The checks of the whole file, once its last line was added."""
        if self.terminal is None:
            raise ArchiveError("only finished streams are imported: the last event is not terminal")
        number, terminal = self.terminal
        state, where = self.header.state, f"line {self.header.number}: meta"
        if state.last_seq != self.count:
            raise ArchiveError(
                f"{where}.last_seq: {state.last_seq}, but the file has {self.count} events"
            )
        status = final_status(terminal)
        if state.status is not status:
            raise ArchiveError(
                f"{where}.status: {state.status.value}, but the terminal event (line {number}) "
                f"makes it {status}"
            )
        if terminal.type is EventType.DONE:
            reason, usage = terminal.data["finish_reason"] or None, terminal.data["usage"]
            expected = {"finish_reason": reason, "usage": usage, "error": None}
        else:
            expected = {"finish_reason": None, "usage": None, "error": terminal.data}
        stored = {"finish_reason": state.finish_reason, "usage": state.usage, "error": state.error}
        for name, value in stored.items():
            if value != expected[name]:
                raise ArchiveError(
                    f"{where}.{name}: differs from the terminal event (line {number})"
                )
        if state.lost_from_seq is not None and state.lost_from_seq > self.count:
            raise ArchiveError(f"{where}.lost_from_seq: beyond the last event")
        if self.position != len(self.header.text):
            raise ArchiveError(
                f"line {self.header.number}: text: "
                f"{len(self.header.text) - self.position} characters longer than the token "
                "events' texts"
            )


def _json(row: str, number: int) -> dict[str, Any]:
    try:
        value = strict_json.loads(row)
    except ValueError as exc:
        raise ArchiveError(f"line {number}: not JSON the broker can store: {exc}") from None
    if not isinstance(value, dict):
        raise ArchiveError(f"line {number}: expected a JSON object")
    return value
