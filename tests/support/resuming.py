"""Reading a stream across cut connections, as a client library's user would: read until the
connection ends; when it is cut, reconnect with the id of the last thing received.

The loop knows nothing about formats or libraries. ``connect(last_id)`` opens a connection
(``None``: the first one, or a resume before anything carried an id) and yields what the
library hands over; ``id_of(item)`` is the id to resume after it (``None``: the item moves
nothing). A connection that ends without one of ``cut_errors`` ends the read: the library
saw the end of the stream (``[DONE]``, a terminal event, a 204).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

#: More connections than this means the resume makes no progress.
MAX_CONNECTIONS = 500


@dataclass
class Connection(Generic[T]):
    """One connection: the id it resumed from, what it delivered, and whether it was cut."""

    resumed_from: str | None
    received: list[T] = field(default_factory=list)
    cut: bool = False


@dataclass
class Resumed(Generic[T]):
    connections: list[Connection[T]] = field(default_factory=list)

    @property
    def received(self) -> list[T]:
        """Everything every connection delivered, in order (a resume's extras included)."""
        return [item for connection in self.connections for item in connection.received]

    @property
    def cuts(self) -> int:
        return sum(connection.cut for connection in self.connections)


def read_resuming(
    connect: Callable[[str | None], Iterator[T]],
    id_of: Callable[[T], str | None],
    *,
    cut_errors: tuple[type[BaseException], ...],
) -> Resumed[T]:
    """Read through ``connect`` until a connection ends without a cut (module docstring)."""
    result: Resumed[T] = Resumed()
    last: str | None = None
    while len(result.connections) < MAX_CONNECTIONS:
        connection: Connection[T] = Connection(resumed_from=last)
        result.connections.append(connection)
        try:
            for item in connect(last):
                connection.received.append(item)
                last = id_of(item) or last
        except cut_errors:
            connection.cut = True
            continue
        return result
    raise AssertionError(f"the stream did not end in {MAX_CONNECTIONS} connections")


async def aread_resuming(
    connect: Callable[[str | None], Awaitable[AsyncIterator[T]]],
    id_of: Callable[[T], str | None],
    *,
    cut_errors: tuple[type[BaseException], ...],
) -> Resumed[T]:
    """``read_resuming`` for async libraries: ``connect`` is awaited for its iterator."""
    result: Resumed[T] = Resumed()
    last: str | None = None
    while len(result.connections) < MAX_CONNECTIONS:
        connection: Connection[T] = Connection(resumed_from=last)
        result.connections.append(connection)
        try:
            async for item in await connect(last):
                connection.received.append(item)
                last = id_of(item) or last
        except cut_errors:
            connection.cut = True
            continue
        return result
    raise AssertionError(f"the stream did not end in {MAX_CONNECTIONS} connections")


def id_order(event_id: str) -> tuple[int, int]:
    """A frame id as a sortable pair: ``"41"`` → (41, 0), ``"41.2"`` → (41, 2); so
    ``41 < 41.1 < 41.2 < 42`` as ``api.resume`` promises."""
    event, _, frame = event_id.partition(".")
    return int(event), int(frame or 0)


def assert_strictly_increasing(event_ids: list[str]) -> None:
    """Each id after the one before: none twice, none out of order."""
    for before, after in itertools.pairwise(event_ids):
        assert id_order(after) > id_order(before), f"id {after} after {before} in {event_ids}"
