"""The broker's exception tree.

Foreign exceptions (redis, openai) are mapped to these at the boundary, so callers handle
one family::

    BrokerError
    ├── ConfigError             a BROKER_* value is unknown or malformed (start-up stops)
    ├── StoreUnavailable        Redis cannot be reached
    │   └── ArchiveUnavailable  the PostgreSQL archive cannot be reached
    ├── ArchiveRefused          the PostgreSQL archive cannot hold a generation's data
    ├── GenerationNotFound      no such generation (never created, or expired)
    ├── ClaimRefused            a sweeper is ending the generation: it is not to be started
    └── AppendRejected          the log refused an append; nothing was written
        ├── StaleWriter         the writer's attempt is no longer the current one (fenced)
        ├── SequenceConflict    the expected next sequence number is not the log's
        └── GenerationEnded     the generation already has its terminal event
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """A configuration value is unknown or malformed; the message names it."""


class StoreUnavailable(BrokerError):
    """Redis cannot be reached (connection refused, timed out, or lost)."""


class ArchiveUnavailable(StoreUnavailable):
    """The PostgreSQL archive (``BROKER_ARCHIVE_URL``) cannot be reached or failed a query:
    to a reader, the same retryable trouble as Redis being away."""


class ArchiveRefused(BrokerError):
    """PostgreSQL refused a generation's data (a value it cannot store, such as a NUL in a
    text field): trying again cannot help."""


class GenerationNotFound(BrokerError):
    def __init__(self, stream_id: str) -> None:
        super().__init__(f"no generation with id {stream_id!r}")
        self.stream_id = stream_id


class ClaimRefused(BrokerError):
    """A claim that would race a sweeper: the generation's queue deadline passed, or a
    sweeper holds it to end it. Nothing was written; the sweeper's end stands."""

    def __init__(self, stream_id: str, reason: str) -> None:
        super().__init__(f"generation {stream_id!r} is not to be started: {reason}")
        self.stream_id = stream_id


class AppendRejected(BrokerError):
    """The append script refused the write; the log and the meta hash are unchanged."""

    def __init__(self, stream_id: str, message: str) -> None:
        super().__init__(f"append to {stream_id!r} rejected: {message}")
        self.stream_id = stream_id


class StaleWriter(AppendRejected):
    """Another attempt owns the generation now; this writer must stop."""


class SequenceConflict(AppendRejected):
    """The writer's idea of the next sequence number differs from the log's."""

    def __init__(self, stream_id: str, expected: int, actual_last: int) -> None:
        super().__init__(
            stream_id, f"expected next seq {expected}, but the log ends at {actual_last}"
        )
        self.expected = expected
        self.actual_last = actual_last


class GenerationEnded(AppendRejected):
    """The generation already reached its terminal event; nothing may follow it."""
