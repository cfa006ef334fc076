"""What the test servers that run beside a test share (``BlipProxy``, ``ThreadedChaosProxy``,
``ScriptedBroker``, ``OpenAIServer``): a context manager that starts one and stops it however
the block ends, and an asyncio event loop on a thread of its own, for a server that sync code
drives (a test that blocks its own loop, or Playwright's sync API, which owns the thread's)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Self, TypeVar

T = TypeVar("T")

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class Background:
    """``with Server(...) as server:``: ``start()`` on entering, ``stop()`` on leaving."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class LoopThread:
    """An event loop running on a daemon thread; ``run()`` waits for a coroutine on it."""

    def __init__(self, exception_handler: ExceptionHandler | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        if exception_handler is not None:
            self.loop.set_exception_handler(exception_handler)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
