"""Archives in the export format (``broker/archive.py``) built without a broker: a finished
stream as a worker would have written it, as a list of JSON objects (header first) that
tests change field by field before they send it."""

from __future__ import annotations

import copy
import json
from typing import Any

from broker.state import iso_ms, new_stream_id, now_ms

Rows = list[dict[str, Any]]


def build(
    texts: list[str] | tuple[str, ...] = ("Hello", ", ", "world"),
    *,
    end: str = "stop",
    stream_id: str | None = None,
    created_at_ms: int | None = None,
    tenant: str = "",
    progress: bool = True,
    tool_call: bool = False,
) -> Rows:
    """A finished stream: ``metadata``, a ``token`` per text (and a ``progress`` after each
    when asked, a ``tool_call`` before the end), then the end: ``done`` with finish reason
    ``end`` (``cancelled`` ends as cancelled), or ``error`` when ``end`` is ``"error"``."""
    created = now_ms() - 10_000 if created_at_ms is None else created_at_ms
    stream_id = stream_id or new_stream_id(created)
    events: Rows = []

    def add(kind: str, data: dict[str, Any]) -> None:
        events.append({"id": len(events) + 1, "event": kind, "t": 10 * len(events), "data": data})

    add("metadata", metadata_event(stream_id, created))
    for tokens, text in enumerate(texts, start=1):
        add("token", {"text": text, "tokens": 1})
        if progress:
            add("progress", progress_event(tokens))
    if tool_call:
        add("tool_call", {"index": 0, "id": "call_1", "name": "lookup", "arguments": "{}"})
    kind, data, outcome = ending(end, tokens=len(texts))
    add(kind, data)
    meta = {
        **stored_meta(stream_id, created, tenant),
        **outcome,
        "last_seq": str(len(events)),
        "finished_at_ms": str(created + 10 * len(events)),
    }
    header = {
        "format": "streambroker.stream",
        "version": 1,
        "id": stream_id,
        "meta": meta,
        "text": "".join(texts),
    }
    return [header, *events]


def metadata_event(stream_id: str, created: int) -> dict[str, Any]:
    """The data of the stream's ``metadata`` event."""
    return {
        "id": stream_id,
        "model": "fake",
        "created_at": iso_ms(created),
        "attempt": 1,
        "metadata": {"session": "s1"},
    }


def progress_event(tokens: int) -> dict[str, Any]:
    """The data of a ``progress`` event after ``tokens`` tokens (of an estimated 10)."""
    return {
        "tokens": tokens,
        "tokens_per_second": 12.5,
        "estimated_total": 10,
        "percent": 10.0 * tokens,
        "eta_ms": 400,
    }


def stored_meta(stream_id: str, created: int, tenant: str) -> dict[str, str]:
    """The header's ``meta`` (the stored hash, every value a string) but for the fields that
    say how the stream ended."""
    return {
        "id": stream_id,
        "model": "fake",
        "created_at_ms": str(created),
        "request": json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]}),
        "tenant": tenant,
        "metadata": json.dumps({"session": "s1"}),
        "attempt": "1",
        "worker": "host-1:123",
        "lease_until_ms": str(created + 5000),
        "started_at_ms": str(created + 5),
        "first_token_at_ms": str(created + 20),
        "connections": "2",
        "resumes": "1",
    }


def ending(end: str, *, tokens: int) -> tuple[str, dict[str, Any], dict[str, str]]:
    """The terminal event (its type and data) and the ``meta`` fields it implies: ``error``
    and a failed stream when ``end`` is ``"error"``; else ``done`` with ``end`` as its finish
    reason, the usage of ``tokens`` tokens, and a cancelled or completed stream."""
    if end == "error":
        error = {"code": "upstream_error", "message": "the model failed", "retryable": True}
        return "error", error, {"status": "failed", "error": json.dumps(error)}
    usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3}
    status = "cancelled" if end == "cancelled" else "completed"
    outcome = {"status": status, "finish_reason": end, "usage": json.dumps(usage)}
    return "done", {"finish_reason": end, "usage": usage}, outcome


def dumps(rows: Rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def changed(rows: Rows, line: int, path: str, value: Any) -> Rows:
    """A copy with the field at ``path`` (dotted: ``meta.usage``, ``data.text``) of row
    ``line`` (0: the header) set to ``value``, or removed when ``value`` is ``REMOVE``."""
    rows = copy.deepcopy(rows)
    *parents, name = path.split(".")
    target = rows[line]
    for part in parents:
        target = target[part]
    if value is REMOVE:
        target.pop(name, None)
    else:
        target[name] = value
    return rows


REMOVE = object()
