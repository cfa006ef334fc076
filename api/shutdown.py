"""Leaving rotation, then ending every event stream cleanly, when the server is told to stop.

uvicorn, on SIGTERM/SIGINT, stops accepting connections and waits for open responses to
finish — which an event stream never does by itself — then cuts them. To end them cleanly
instead (each client gets a complete response and reconnects elsewhere with its last id),
the app chains an ``ExitDrain`` in front of the handlers the server installed for those
signals. uvicorn installs them before the app's lifespan starts and puts its own originals
back after it stops, so the chained handler lives exactly as long as the app.

With ``BROKER_DRAIN_SECONDS`` (``streambroker api --drain-seconds``) above 0, the first signal
only makes the process *draining*: ``/readyz`` answers 503 ``{"status": "draining"}`` at once,
while everything else is served as before, so that a load balancer's health check or a
Kubernetes endpoint controller takes the process out of rotation before it stops accepting
connections. When the time is up, or at a second signal, the streams are ended and uvicorn's
own handler runs (it stops, with its graceful timeout). With 0, the first signal does all of
that at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)

Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None

logger = logging.getLogger("streambroker.api")


class ExitDrain:
    """What an exit signal does to this process: draining for ``seconds`` (see the module
    docstring), then ``end_streams`` and the server's own handler.

    ``on_signal`` runs inside a signal handler: it only sets a flag and schedules work on
    ``loop``; the rest runs in the loop.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        end_streams: Callable[[], object],
        *,
        seconds: float = 0.0,
    ) -> None:
        self._loop = loop
        self._end_streams = end_streams
        self.seconds = seconds
        #: Set by the first exit signal: ``/readyz`` answers 503 from then on.
        self.draining = False
        #: Set once the streams were ended and the server told to stop.
        self.stopping = False
        self._timer: asyncio.TimerHandle | None = None

    def on_signal(self, signum: int, frame: FrameType | None, handler: Handler) -> None:
        """An exit signal arrived; ``handler`` is the one it had before (the server's)."""
        if self.stopping:  # a later signal: the server's own meaning (uvicorn: force exit)
            _forward(signum, frame, handler)
        elif not self.draining and self.seconds > 0:
            self.draining = True
            self._loop.call_soon_threadsafe(self._wait, signum, handler)
        else:  # no wait asked for, or a second signal cuts it short
            self.draining = True
            self._stop(signum, frame, handler)

    def _wait(self, signum: int, handler: Handler) -> None:
        if not self.stopping:
            logger.info(
                "draining: /readyz answers 503 for %g s, then event streams end and the "
                "server stops (a second signal: at once)",
                self.seconds,
            )
            self._timer = self._loop.call_later(self.seconds, self._stop, signum, None, handler)

    def _stop(self, signum: int, frame: FrameType | None, handler: Handler) -> None:
        if self.stopping:
            return
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()
        self._loop.call_soon_threadsafe(self._end_streams)
        _forward(signum, frame, handler)


def _forward(signum: int, frame: FrameType | None, handler: Handler) -> None:
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def drain_on_exit_signals(drain: ExitDrain) -> Callable[[], None]:
    """Let ``drain`` handle every exit signal first; returns the undo function.

    Outside the main thread (an app under a test client) signals cannot be handled, and
    this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Handler] = {}
    for sig in EXIT_SIGNALS:
        handler = signal.getsignal(sig)
        previous[sig] = handler
        signal.signal(sig, _chained(drain, handler))

    def undo() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return undo


def _chained(drain: ExitDrain, handler: Handler) -> Callable[[int, FrameType | None], None]:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        drain.on_signal(signum, frame, handler)

    return on_signal
