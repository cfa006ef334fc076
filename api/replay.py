"""Timed replay: a recorded stream re-emitted with its original pacing, scaled by a speed.

``GET /v1/streams/{id}/events?replay=<speed>``: each event goes out when its ``t`` (ms since
the generation was created) says, divided by ``speed``, counted from the first event sent;
1 is as it happened, 10 ten times faster. It works from any resume point, and on a live
stream: once the replay has caught up with the log's end, the client follows live (the same
path as a plain watch). During a long pause a ``: ping`` still goes out every heartbeat.
"""

from __future__ import annotations

import asyncio
import math
from contextlib import aclosing

from api.errors import ApiError
from api.hub import ReaderHub
from api.sse import PING, Frames
from api.watch import CATCH_UP_COUNT, Delivery, Reader, watch_frames
from broker.generation_log import GenerationLog
from broker.numbers import InvalidNumber, parse_decimal

MIN_SPEED = 0.01
MAX_SPEED = 1000.0
#: Longest speed text read: JavaScript's String() writes up to 17 significant digits, so
#: 0.1 + 0.2 arrives as "0.30000000000000004" (19 characters).
_SPEED_CHARS = 32


def parse_speed(raw: str) -> float:
    """ASCII digits with at most one '.' between them (``broker.numbers``): "2", "0.5", not
    "+2", "2e0", "nan" or other scripts' digits, which ``float()`` reads."""
    try:
        speed = parse_decimal(raw, max_chars=_SPEED_CHARS)
    except InvalidNumber:
        speed = math.nan
    if not (MIN_SPEED <= speed <= MAX_SPEED):  # also refuses NaN
        raise ApiError(
            400,
            "invalid_request",
            f"replay: expected a speed from {MIN_SPEED:g} to {MAX_SPEED:g} (1 = as recorded)",
        )
    return speed


async def replay_frames(
    log: GenerationLog,
    hub: ReaderHub,
    stream_id: str,
    after_seq: int,
    *,
    speed: float,
    heartbeat_seconds: float,
    delivery: Delivery | None = None,
) -> Frames:
    loop = asyncio.get_running_loop()
    reader = Reader(log, stream_id, after_seq, delivery)
    start: tuple[float, int] | None = None  # (loop time, event t) of the first event sent
    while not reader.ended:
        events = await log.read(stream_id, reader.cursor, count=CATCH_UP_COUNT)
        for event in events:
            if start is None:
                start = (loop.time(), event.t)
            due = start[0] + (event.t - start[1]) / 1000 / speed
            while (wait := due - loop.time()) > 0:
                await asyncio.sleep(min(wait, heartbeat_seconds))
                if due - loop.time() > 0:
                    yield PING
            yield reader.render([event])
            if reader.ended:
                return
        if len(events) < CATCH_UP_COUNT:
            break  # caught up with a live stream: follow it as it happens
    if not reader.ended:
        live = watch_frames(log, hub, stream_id, reader.cursor, delivery=reader.delivery)
        async with aclosing(live):
            async for chunk in live:
                yield chunk
