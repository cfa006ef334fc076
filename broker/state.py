"""A generation's state: the meta hash in Redis, as a typed record and as API JSON.

The meta hash stores flat string fields; structured values (the request, metadata, usage,
error) are JSON so that an operator reading Redis with ``redis-cli`` can still read them.
"""

from __future__ import annotations

import enum
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


class Status(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (Status.COMPLETED, Status.FAILED, Status.CANCELLED)


_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


#: The (ms, random part) of the last id ``new_stream_id`` made in this process for "now".
_last_new_id = (0, 0)
_new_id_lock = threading.Lock()


def new_stream_id(now_ms: int | None = None) -> str:
    """A 26-character, time-ordered, URL-safe id (ULID layout, lower-case Crockford base32).

    Time-ordered so that ids sort roughly by creation, which helps operators, and listings
    of streams created in the same millisecond (their index ties are ordered by id); 80
    random bits so that ids cannot be guessed, which matters when ids are shared as links.

    Ids made for now (no ``now_ms``) also increase strictly within a process: one made in
    the same millisecond as the one before follows it by a random step of up to 2**64 (so
    the next id is still not guessable from the last), in the next millisecond on overflow.
    """
    if now_ms is not None:
        return _encode_id(now_ms, int.from_bytes(os.urandom(10), "big"))
    global _last_new_id
    with _new_id_lock:
        ms, random_part = int(time.time() * 1000), int.from_bytes(os.urandom(10), "big")
        last_ms, last_random = _last_new_id
        if ms <= last_ms:  # the same millisecond, or the clock stepped back
            ms, random_part = last_ms, last_random + 1 + int.from_bytes(os.urandom(8), "big")
            if random_part >> 80:
                ms, random_part = last_ms + 1, int.from_bytes(os.urandom(10), "big")
        _last_new_id = (ms, random_part)
    return _encode_id(ms, random_part)


def _encode_id(ms: int, random_part: int) -> str:
    value = (ms << 80) | random_part
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def is_stream_id(text: str) -> bool:
    return len(text) == 26 and all(c in _CROCKFORD for c in text)


def now_ms() -> int:
    return int(time.time() * 1000)


def iso_ms(ms: int | None) -> str | None:
    """Unix milliseconds → RFC 3339 UTC with milliseconds, the form every API timestamp takes."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@dataclass(frozen=True)
class GenerationState:
    id: str
    model: str
    status: Status
    created_at_ms: int
    request: dict[str, Any]
    tenant: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0
    last_seq: int = 0
    started_at_ms: int | None = None
    first_token_at_ms: int | None = None
    finished_at_ms: int | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    #: Set when Redis lost events this generation's writer had appended (a crash before
    #: they were saved, a failover to a replica that lacked them): the first id that was, or
    #: may have been, lost. Readers holding it or a later one get ``log_lost``.
    lost_from_seq: int | None = None
    #: Event connections opened on this generation, and how many of them were resumes.
    connections: int = 0
    resumes: int = 0
    #: The id this generation had in the file it was imported from, when an import gave it
    #: a new one (auth on: ``broker.archive``); None for a generation created here.
    imported_from: str | None = None
    #: How many times a new attempt continued this generation after its writer was lost or
    #: stopped (``workers.continuation``); 0 normally.
    continuations: int = 0
    #: While a continuation waits for a worker: why the last writer stopped, and since when
    #: (ms since 1970); None otherwise.
    handover_reason: str | None = None
    handover_since_ms: int | None = None
    #: The number of the continuation waiting for a worker (the only job that may claim it).
    pending_continuation: int | None = None
    text: str = ""

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes], text: bytes | None = None) -> GenerationState:
        h = {k.decode(): v.decode() for k, v in raw.items()}

        def opt_int(name: str) -> int | None:
            return int(h[name]) if h.get(name) else None

        def opt_json(name: str) -> Any:
            return json.loads(h[name]) if h.get(name) else None

        # A continuation waits for a worker (one that ended meanwhile waits no more).
        pending = bool(h.get("handover")) and not Status(h["status"]).terminal

        return cls(
            id=h["id"],
            model=h["model"],
            status=Status(h["status"]),
            created_at_ms=int(h["created_at_ms"]),
            request=json.loads(h["request"]),
            tenant=h.get("tenant", ""),
            metadata=opt_json("metadata") or {},
            attempt=int(h.get("attempt", "0")),
            last_seq=int(h.get("last_seq", "0")),
            started_at_ms=opt_int("started_at_ms"),
            first_token_at_ms=opt_int("first_token_at_ms"),
            finished_at_ms=opt_int("finished_at_ms"),
            finish_reason=h.get("finish_reason") or None,
            usage=opt_json("usage"),
            error=opt_json("error"),
            cancel_requested=h.get("cancel_requested") == "1",
            lost_from_seq=opt_int("lost_from_seq"),
            connections=int(h.get("connections", "0")),
            resumes=int(h.get("resumes", "0")),
            imported_from=h.get("imported_from") or None,
            continuations=int(h.get("continuations", "0")),
            handover_reason=(h.get("handover_reason") or None) if pending else None,
            handover_since_ms=opt_int("handover_since_ms") if pending else None,
            pending_continuation=opt_int("handover") if pending else None,
            text=(text or b"").decode("utf-8", errors="replace"),
        )

    def to_hash(self) -> dict[str, str]:
        """The fields written when the generation is created (later ones come from scripts)."""
        return {
            "id": self.id,
            "model": self.model,
            "status": self.status.value,
            "created_at_ms": str(self.created_at_ms),
            "request": json.dumps(self.request, separators=(",", ":")),
            "tenant": self.tenant,
            "metadata": json.dumps(self.metadata, separators=(",", ":")),
            "attempt": str(self.attempt),
            "last_seq": str(self.last_seq),
        }

    @property
    def tokens_per_second(self) -> float | None:
        """Completion tokens over the time from the first token to the end (finished only)."""
        tokens = (self.usage or {}).get("completion_tokens")
        if not tokens or self.first_token_at_ms is None or self.finished_at_ms is None:
            return None
        seconds = (self.finished_at_ms - self.first_token_at_ms) / 1000
        return round(tokens / seconds, 1) if seconds > 0 else None

    def to_api(self, *, include_text: bool = True) -> dict[str, Any]:
        """The JSON shape of ``GET /v1/streams/{id}``, plus timing figures."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "stream",
            "status": self.status.value,
            "model": self.model,
            "created_at": iso_ms(self.created_at_ms),
            "started_at": iso_ms(self.started_at_ms),
            "first_token_at": iso_ms(self.first_token_at_ms),
            "finished_at": iso_ms(self.finished_at_ms),
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "error": self.error,
            "metadata": self.metadata,
            # The API key's tenant that created it; null when auth is off.
            "tenant": self.tenant or None,
            "last_event_id": self.last_seq,
            "attempt": self.attempt,
            "continuations": self.continuations,
            # While a continuation waits for a worker to pick it up; null otherwise.
            "handover": (
                {"reason": self.handover_reason, "since": iso_ms(self.handover_since_ms)}
                if self.handover_reason is not None
                else None
            ),
            # Events after this id were (or may have been) lost once (a Redis crash or
            # failover); null when none were.
            "lost_after_event_id": (
                self.lost_from_seq - 1 if self.lost_from_seq is not None else None
            ),
            "time_to_first_token_ms": (
                self.first_token_at_ms - self.created_at_ms
                if self.first_token_at_ms is not None
                else None
            ),
            "duration_ms": (
                self.finished_at_ms - self.started_at_ms
                if self.finished_at_ms is not None and self.started_at_ms is not None
                else None
            ),
            "tokens_per_second": self.tokens_per_second,
            "connections": self.connections,
            "resumes": self.resumes,
            "imported_from": self.imported_from,
        }
        if include_text:
            body["text"] = self.text
        return body
