"""Where Redis's failures and refusals become the exceptions of ``broker.errors``.

Two boundaries: ``store_errors`` around any call that reaches Redis (a store that cannot be
reached right now, which callers may ride out), and ``script_refusals`` around the calls of
the generation scripts (``broker.scripts``), whose error replies start with a stable code
that says why the script refused (fenced, ended, out of sequence, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis.exceptions as redis_errors

from broker.errors import (
    ClaimRefused,
    GenerationEnded,
    GenerationNotFound,
    SequenceConflict,
    StaleWriter,
    StoreUnavailable,
)


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


@contextlib.contextmanager
def script_refusals(stream_id: str, *, expected: int = 0) -> Iterator[None]:
    """Turn the scripts' error replies into the exception tree of ``broker.errors``.

    ``expected`` is the sequence number an append expected to write at (what a ``SEQ``
    refusal reports beside the log's actual position)."""
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
