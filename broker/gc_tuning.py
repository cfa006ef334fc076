"""Keep the cyclic garbage collector's full passes short in long-running processes."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Take everything allocated so far out of the cyclic collector's reach.

    Modules, classes and functions of starlette, redis, arq, openai and pydantic live as long
    as the process, yet every full collection walks them all, with the event loop stopped.
    In an api serving many SSE clients a full pass is a latency spike for every client;
    freezing takes the start-up objects out of it (``infra/bench/fanout.py`` times the
    passes with ``gc.callbacks``; figures in infra/bench/results/fanout.md). Frozen objects
    are still freed by reference counting; only a reference cycle among them would never be
    collected, and start-up objects are not garbage (the ``collect`` first makes sure of
    that).
    """
    gc.collect()
    gc.freeze()
