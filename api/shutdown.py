"""Ending every event stream cleanly when the server is told to stop.

uvicorn, on SIGTERM/SIGINT, stops accepting connections and waits for open responses to
finish — which an event stream never does by itself — then cuts them. To end them cleanly
instead (each client gets a complete response and reconnects elsewhere with its last id),
the app chains a drain in front of the handlers the server installed for those signals.
uvicorn installs them before the app's lifespan starts and puts its own originals back
after it stops, so the chained handler lives exactly as long as the app.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)

Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


def drain_on_exit_signals(drain: Callable[[], object]) -> Callable[[], None]:
    """Call ``drain`` first whenever an exit signal arrives; returns the undo function.

    ``drain`` runs inside a signal handler, so it must only schedule work (for example with
    ``loop.call_soon_threadsafe``). Outside the main thread (an app under a test client)
    signals cannot be handled, and this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Handler] = {}
    for sig in EXIT_SIGNALS:
        handler = signal.getsignal(sig)
        previous[sig] = handler
        signal.signal(sig, _chained(drain, sig, handler))

    def undo() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return undo


def _chained(
    drain: Callable[[], object], sig: int, handler: Handler
) -> Callable[[int, FrameType | None], None]:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        drain()
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)

    return on_signal
