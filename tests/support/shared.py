"""Setups that consecutive tests share across module boundaries: the processes a module used
to start once for all its tests, now that its tests are split into modules by topic.

A fixture asks ``SHARED.get(name, start)`` for its setup, ``name`` being the fixture's own
name: the first test that asks starts it (``start()`` returns a context manager), the tests
after it get the same one, and it is stopped as soon as the next test to run does not ask
for that fixture (``pytest_runtest_teardown`` in ``tests/conftest.py``), or when the session
ends. Modules that share a setup keep it by running one after the other (their names sort
together); a module run alone starts and stops its own, as with a module-scoped fixture.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, ExitStack
from typing import Any, TypeVar, cast

T = TypeVar("T")


class SharedSetups:
    def __init__(self) -> None:
        self._open: dict[str, tuple[Any, ExitStack]] = {}

    def get(self, name: str, start: Callable[[], AbstractContextManager[T]]) -> T:
        """The running setup ``name``, started with ``start`` if none runs."""
        if name not in self._open:
            stack = ExitStack()
            value = stack.enter_context(start())
            self._open[name] = (value, stack)
        return cast(T, self._open[name][0])

    def release_unneeded(self, needed: Collection[str]) -> None:
        """Stop every running setup whose name is not in ``needed``."""
        for name in [name for name in self._open if name not in needed]:
            _, stack = self._open.pop(name)
            stack.close()

    def close(self) -> None:
        self.release_unneeded(())


SHARED = SharedSetups()
