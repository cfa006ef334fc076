"""Waiting for a condition, never for a fixed time.

``eventually(predicate)`` calls ``predicate`` until it returns something truthy, and returns
that; past ``timeout`` seconds it fails the test (an ``AssertionError`` saying what was waited
for). ``eventually_async`` is the same inside an event loop, for a predicate that may itself
be a coroutine function (an HTTP request, a Redis read). An exception the predicate raises
(a process that died, a wrong answer) ends the wait at once: only "not yet" is retried.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

T = TypeVar("T")

#: Long enough for a loaded 2-core CI machine; a condition that never holds fails by then.
TIMEOUT = 20.0

Describe = str | Callable[[], str]


def eventually(
    predicate: Callable[[], T],
    *,
    timeout: float = TIMEOUT,
    interval: float = 0.02,
    what: Describe = "",
) -> T:
    """The first truthy value of ``predicate()``, polled every ``interval`` seconds."""
    deadline = _Deadline(timeout, predicate, what)
    while not (result := predicate()):
        deadline.check()
        time.sleep(interval)
    return result


async def eventually_async(
    predicate: Callable[[], T | Awaitable[T]],
    *,
    timeout: float = TIMEOUT,  # noqa: ASYNC109 - eventually()'s own, for both flavours
    interval: float = 0.01,
    what: Describe = "",
) -> T:
    """``eventually`` for async tests: the loop keeps running between polls."""
    deadline = _Deadline(timeout, predicate, what)
    while not (result := await _value(predicate())):
        deadline.check()
        await anyio.sleep(interval)
    return result


async def _value(result: T | Awaitable[T]) -> T:
    if inspect.isawaitable(result):
        return await result
    return result


class _Deadline:
    def __init__(self, timeout: float, predicate: Callable[..., object], what: Describe) -> None:
        self.timeout = timeout
        self.end = time.monotonic() + timeout
        self.predicate = predicate
        self.what = what

    def check(self) -> None:
        """Fail the test, saying what was waited for, once the time is up."""
        if time.monotonic() < self.end:
            return
        detail = self.what() if callable(self.what) else self.what
        if not detail:
            try:
                detail = inspect.getsource(self.predicate).strip()
            except (OSError, TypeError):
                detail = repr(self.predicate)
        raise AssertionError(f"still not so after {self.timeout} s: {detail}")
