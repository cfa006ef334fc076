"""A batch of events as the append script (``broker.scripts.APPEND``) takes it.

The script's ``ARGV`` is positional, so its layout is built in one place: the fencing and
timing values, the final status a terminal event gives the generation, a token that makes
a retried batch recognisable, then each event with the text it adds, and last the result
fields a terminal event records in the meta hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from broker.events import Event, EventType
from broker.keys import MetaField
from broker.state import Status


def final_status(event: Event) -> Status | None:
    """The status a terminal event gives its generation; None for any other event."""
    if event.type is EventType.ERROR:
        return Status.FAILED
    if event.type is EventType.DONE:
        if event.data.get("finish_reason") == "cancelled":
            return Status.CANCELLED
        return Status.COMPLETED
    return None


def append_args(
    batch: Sequence[Event],
    *,
    attempt: int,
    first_seq: int,
    now: int,
    lease_ms: int,
    retention_seconds: int,
    in_doubt: bool = False,
) -> list[Any]:
    """The script's ``ARGV`` for appending ``batch`` at ``first_seq`` (``broker.scripts``
    documents each position); ``in_doubt``: an earlier batch of this writer at ``first_seq``
    failed with its outcome unknown. ``ValueError`` for a batch the log must never hold: an empty
    one, or one with a terminal event before its end."""
    if not batch:
        raise ValueError("an append needs at least one event")
    args: list[Any] = [attempt, first_seq, now, lease_ms, retention_seconds]
    final = final_status(batch[-1])
    if any(final_status(e) for e in batch[:-1]):
        raise ValueError("a terminal event must be the last of its batch")
    args.append(final.value if final else "")
    payloads = [event.encode() for event in batch]
    args.append(_batch_token(attempt, first_seq, payloads))
    args.append("1" if in_doubt else "")
    args.append(len(batch))
    for event, payload in zip(batch, payloads, strict=True):
        text = event.data.get("text", "") if event.type is EventType.TOKEN else ""
        args.extend([payload, text])
    if final:
        args.extend(_final_fields(batch[-1]))
    return args


def _final_fields(event: Event) -> list[str]:
    """Meta-hash fields recorded with the terminal event (the result a state read returns)."""
    if event.type is EventType.DONE:
        return [
            MetaField.FINISH_REASON,
            str(event.data.get("finish_reason") or ""),
            MetaField.USAGE,
            json.dumps(event.data.get("usage"), separators=(",", ":")),
        ]
    return [MetaField.ERROR, json.dumps(event.data, separators=(",", ":"))]


def _batch_token(attempt: int, first_seq: int, payloads: list[bytes]) -> str:
    """Identifies one batch of one writer, so a retry of it is recognised as already stored."""
    digest = hashlib.blake2b(digest_size=8)
    for payload in payloads:
        digest.update(len(payload).to_bytes(4, "big"))
        digest.update(payload)
    return f"{attempt}:{first_seq}:{digest.hexdigest()}"
