"""What one watching client receives: recorded events from its resume point, then live ones.

Each client reads the log from its own cursor with blocking ``XREAD``: catch-up and live
tailing are the same call (``XREAD`` answers at once when entries exist past the cursor), so
there is no hand-over where an event could be missed or repeated. Events read together are
written together, as one chunk. Heartbeats are the blocking read timing out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from api.sse import PING, encode_event, retry_frame
from broker.log import GenerationLog


async def watch_frames(
    log: GenerationLog, stream_id: str, after_seq: int, *, heartbeat_seconds: float, retry_ms: int
) -> AsyncIterator[bytes]:
    """SSE bytes for one client; ends after the terminal event."""
    yield retry_frame(retry_ms)
    cursor = after_seq
    block_ms = max(1, int(heartbeat_seconds * 1000))
    while True:
        events = await log.read(stream_id, cursor, block_ms=block_ms)
        if not events:
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
