"""What each value of an archive may hold: the payload of each event type, as the broker
writes it, and each field of the meta hash (``keys.MetaField``), as Redis holds it.

The checks say what is wrong rather than raise: ``broker.archive_format`` puts the problem in
an ``ArchiveError`` that names the line and the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker import strict_json
from broker.events import RESERVED, EventType
from broker.keys import MetaField
from broker.state import Status, is_stream_id

#: The last millisecond an API time can show (RFC 3339 has four-digit years).
MAX_TIME_MS = 253_402_300_799_999
#: Largest count in the meta hash: exact in every JSON reader, and far from the 64-bit end
#: that Redis's ``HINCRBY`` (a reader's connection count) would overflow.
MAX_COUNT = 2**53 - 1

# -- event payloads --------------------------------------------------------------------

Check = tuple[Callable[[Any], bool], str]  # (accepts a value?, what it expects)


def is_count(value: Any) -> bool:
    """A whole number of JSON, not negative (``true`` is an int in Python, not a count here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_usage(value: Any) -> bool:
    return isinstance(value, dict) and all(is_count(n) for n in value.values())


def _or_null(check: Check) -> Check:
    accepts, expected = check
    return (lambda value: value is None or accepts(value)), f"{expected} or null"


TEXT: Check = (lambda value: isinstance(value, str), "a string")
COUNT: Check = (is_count, "a whole number")
NUMBER: Check = (_is_number, "a number")
FLAG: Check = (lambda value: isinstance(value, bool), "true or false")
OBJECT: Check = (lambda value: isinstance(value, dict), "an object")
USAGE: Check = (_is_usage, "an object of whole numbers")

#: The payload of each event type, as the broker writes it (``broker.events``, the worker's
#: job): every field required, no other allowed, except those in ``OPTIONAL``.
PAYLOADS: dict[EventType, dict[str, Check]] = {
    EventType.METADATA: {
        "id": TEXT,
        "model": TEXT,
        "created_at": TEXT,
        "attempt": COUNT,
        "metadata": OBJECT,
    },
    EventType.TOKEN: {"text": TEXT, "tokens": COUNT},
    EventType.TOOL_CALL: {
        "index": COUNT,
        "id": _or_null(TEXT),
        "name": _or_null(TEXT),
        "arguments": TEXT,
    },
    EventType.PROGRESS: {
        "tokens": COUNT,
        "tokens_per_second": NUMBER,
        "estimated_total": _or_null(COUNT),
        "percent": _or_null(NUMBER),
        "eta_ms": _or_null(COUNT),
    },
    EventType.RESUMED: {"attempt": COUNT, "after_event_id": COUNT, "reason": TEXT},
    EventType.ERROR: {"code": TEXT, "message": TEXT, "retryable": FLAG},
    EventType.DONE: {"finish_reason": TEXT, "usage": USAGE},
}
OPTIONAL: dict[EventType, dict[str, Check]] = {EventType.ERROR: {"retry_after": NUMBER}}


def payload_problem(kind: EventType, data: Any) -> tuple[str, str] | None:
    """``(field, problem)`` when ``data`` is not a payload of ``kind``; None when it is."""
    if not isinstance(data, dict):
        return "", "expected an object"
    fields, optional = PAYLOADS[kind], OPTIONAL.get(kind, {})
    for name in data:
        if name in RESERVED:
            return name, "reserved (an event's type and time are fields of its line)"
        if name not in fields and name not in optional:
            return name, f"not a field of a {kind.value} event"
    for name, (accepts, expected) in (fields | optional).items():
        if name not in data:
            if name in fields:
                return name, "missing"
        elif not accepts(data[name]):
            return name, f"expected {expected}"
    return None


# -- the meta hash ---------------------------------------------------------------------

MetaCheck = Callable[[str], str | None]  # a meta field's value -> its problem, or None


def _whole_number(maximum: int) -> MetaCheck:
    """Decimal digits without leading zeros (as Redis and ``str(int)`` write them), at most
    ``maximum``."""

    def problem(value: str) -> str | None:
        if not (value.isascii() and value.isdigit()) or (value[0] == "0" and value != "0"):
            return f"expected a whole number in decimal digits, not {value[:40]!r}"
        if int(value) > maximum:
            return "out of range"
        return None

    return problem


def _json_of(check: Check) -> MetaCheck:
    """JSON text (held to ``strict_json``'s rules) whose value ``check`` accepts."""
    accepts, expected = check

    def problem(value: str) -> str | None:
        try:
            parsed = strict_json.loads(value)
        except ValueError as exc:
            return f"not JSON the broker can store ({exc})"
        if not accepts(parsed):
            return f"expected JSON of {expected}"
        return None

    return problem


def _stream_id(value: str) -> str | None:
    return None if is_stream_id(value) else "not a stream id"


def _finished_status(value: str) -> str | None:
    if value not in {s.value for s in Status}:
        return f"{value[:40]!r} is not a status"
    if not Status(value).terminal:
        return f"only finished streams are imported, not {value} ones"
    return None


def _flag(value: str) -> str | None:
    return None if value in ("", "0", "1") else "expected 0 or 1"


def _any_text(value: str) -> str | None:
    return None


def _tenant(value: str) -> str | None:
    """A tenant's name, as ``BROKER_API_KEYS`` can give one: no control characters (a NUL,
    which PostgreSQL's text cannot hold, would keep the stream out of the archive)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "a tenant name without control characters"
    return None


_META_TIME = _whole_number(MAX_TIME_MS)
_META_COUNT = _whole_number(MAX_COUNT)
_ERROR_PAYLOAD: Check = (lambda value: payload_problem(EventType.ERROR, value) is None, "an error")

#: How each field of the meta hash is checked, in ``keys.MetaField``'s order; a field not in
#: this table is not one a generation has.
_META_CHECKS: dict[str, MetaCheck] = {
    MetaField.ID: _stream_id,
    MetaField.MODEL: _any_text,
    MetaField.STATUS: _finished_status,
    MetaField.TENANT: _tenant,
    MetaField.REQUEST: _json_of(OBJECT),
    MetaField.METADATA: _json_of(OBJECT),
    MetaField.CREATED_AT_MS: _META_TIME,
    MetaField.STARTED_AT_MS: _META_TIME,
    MetaField.FIRST_TOKEN_AT_MS: _META_TIME,
    MetaField.FINISHED_AT_MS: _META_TIME,
    MetaField.ATTEMPT: _META_COUNT,
    MetaField.LAST_SEQ: _META_COUNT,
    MetaField.LEASE_UNTIL_MS: _META_TIME,
    MetaField.WORKER: _any_text,
    MetaField.LAST_BATCH: _any_text,
    MetaField.CANCEL_REQUESTED: _flag,
    MetaField.FINISH_REASON: _any_text,
    MetaField.USAGE: _json_of(USAGE),
    MetaField.ERROR: _json_of(_ERROR_PAYLOAD),
    MetaField.LOST_FROM_SEQ: _META_COUNT,
    MetaField.CONNECTIONS: _META_COUNT,
    MetaField.RESUMES: _META_COUNT,
    MetaField.IMPORTED_FROM: _stream_id,
    MetaField.CONTINUATIONS: _META_COUNT,
    MetaField.CONTINUATIONS_LOST: _META_COUNT,
    MetaField.HANDOVER_QUEUED: _META_COUNT,
    MetaField.HANDOVER: _META_COUNT,
    MetaField.HANDOVER_REASON: _any_text,
    MetaField.HANDOVER_SINCE_MS: _META_TIME,
    # Store-local: never exported, and dropped by an import (``broker.archive``).
    MetaField.EPOCH: _any_text,
    MetaField.ARCHIVED_AT_MS: _META_TIME,
}


def meta_problem(name: str, value: str) -> str | None:
    """What is wrong with ``value`` as the meta hash's field ``name``; None when nothing is."""
    check = _META_CHECKS.get(name)
    if check is None:
        return "not a field of a generation's state"
    return check(value)
