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

from broker import metrics
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
    client reaches the new master. So does ``NOREPLICAS``: a master with
    ``min-replicas-to-write`` that lost its replicas (``infra/sentinel/``). ``BusyLoadingError``
    (a restarting Redis reading its AOF) is a ``ConnectionError`` in redis-py.

    Each conversion is counted (``streambroker_store_errors_total``): what an alert on an
    unreachable Redis watches, in api and worker processes alike.
    """
    try:
        yield
    except redis_errors.RedisError as exc:
        if not means_store_unavailable(exc):
            raise
        metrics.count_store_error()
        raise StoreUnavailable(f"Redis is unreachable: {reply_text(exc)}") from exc


def reply_text(exc: BaseException) -> str:
    """What Redis (or the connection) said, without the command: the error of a pipeline
    repeats the command and its arguments, which may hold a user's prompt."""
    message = str(exc)
    _, in_pipeline, reply = message.partition(" of pipeline caused error: ")
    return reply if in_pipeline else message


#: Replies that pass once the store settles after a failover: a demoted master
#: (``READONLY``); a script missing after redis-py loaded it and called it again (the two
#: went to different nodes while a pool moved to a new master, which starts with no
#: scripts); a cluster whose slot map is changing (``CLUSTERDOWN``, ``TRYAGAIN``).
_SETTLING = (
    redis_errors.ReadOnlyError,
    redis_errors.NoScriptError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
)


def means_store_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the store cannot take this command now, but may in a moment:
    unreachable, timed out, failing over (``_SETTLING``), or a master cut off from its
    replicas."""
    return isinstance(
        exc, (redis_errors.ConnectionError, redis_errors.TimeoutError, *_SETTLING)
    ) or is_no_replicas(exc)


def is_no_replicas(exc: BaseException) -> bool:
    """A ``NOREPLICAS`` refusal: the master has fewer good replicas than
    ``min-replicas-to-write`` asks for (redis-py has no exception class of its own for it;
    a script's error carries the same code first, a pipeline's after its own preamble)."""
    if not isinstance(exc, redis_errors.ResponseError):
        return False
    return reply_text(exc).lstrip("('\"").startswith("NOREPLICAS ")


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
