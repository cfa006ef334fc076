"""Simulate what a Redis crash before an fsync does to one generation."""

from __future__ import annotations

from broker import keys
from broker.events import EventType
from broker.generation_log import GenerationLog


async def lose_events_after(log: GenerationLog, stream_id: str, kept: int) -> None:
    """The log, its meta hash and its text roll back together (they share one AOF) to just
    after event ``kept``, as if the later writes never reached the disk."""
    redis = log.redis
    events = await log.read(stream_id, 0, count=100_000)
    log_key = keys.log_key(stream_id)
    entries = await redis.xrange(log_key, "-", f"0-{kept}")
    await redis.delete(log_key)  # a restored stream's top id is its last entry's, too
    for entry_id, fields in entries:
        await redis.xadd(log_key, fields, id=entry_id)
    await redis.hset(keys.meta_key(stream_id), mapping={"last_seq": kept, "last_batch": ""})
    text = "".join(e.data["text"] for e in events if e.seq <= kept and e.type is EventType.TOKEN)
    await redis.set(keys.text_key(stream_id), text)
