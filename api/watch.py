"""What one watching client receives: recorded events from its resume point, then live ones.

Each client reads the log from its own cursor with blocking ``XREAD``: catch-up and live
tailing are the same call (``XREAD`` answers at once when entries exist past the cursor), so
there is no hand-over where an event could be missed or repeated. Events read together are
written together, as one chunk. Heartbeats are the blocking read timing out; each also checks
that the generation still exists, so a watcher of an expired one does not ping forever.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from api.sse import PING, encode_event, retry_frame
from broker.errors import StoreUnavailable
from broker.log import GenerationLog

logger = logging.getLogger("streambroker.api")


async def watch_frames(
    log: GenerationLog,
    stream_id: str,
    after_seq: int,
    *,
    heartbeat_seconds: float,
    retry_ms: int,
) -> AsyncIterator[bytes]:
    """SSE bytes for one client; ends after the terminal event.

    It also ends, without a terminal event, when the generation disappears (expired or
    deleted: the client's reconnect then gets 404) or Redis becomes unreachable (the
    client reconnects after ``retry`` and resumes from the last id it received).
    """
    yield retry_frame(retry_ms)
    cursor = after_seq
    block_ms = max(1, int(heartbeat_seconds * 1000))
    try:
        while True:
            events = await log.read(stream_id, cursor, block_ms=block_ms)
            if not events:
                position = await log.position(stream_id)
                if position is None:
                    return
                yield PING
                continue
            chunk = bytearray()
            for event in events:
                chunk += encode_event(event)
                cursor = event.seq
                if event.terminal:
                    yield bytes(chunk)
                    return
            yield bytes(chunk)
    except StoreUnavailable:
        logger.warning(
            "stream %s: Redis unreachable, ending the response to resume later", stream_id
        )
