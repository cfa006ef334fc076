"""Per-tenant limits on concurrent event connections, held across every front-end.

Each open event stream of a tenant holds a *slot*: a member of the sorted set
``sb:conns:<tenant>`` scored by when the slot expires. Taking one is a Lua script that first
drops expired slots, then refuses if the tenant holds ``limit`` already, so the count is
exact across all api processes. A process renews its slots every third of their lifetime
and removes each when its response ends; a process that dies holding slots stops renewing
them, and they expire (``BROKER_CONNECTION_SLOT_SECONDS``) instead of being leaked as a bare
counter would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import defaultdict

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from broker import keys
from broker.log import store_errors
from broker.state import now_ms

logger = logging.getLogger("streambroker.api")

#: KEYS: the tenant's slot set. ARGV: slot id, now (ms), slot lifetime (ms), limit.
#: Returns 1 (taken) or 0 (the tenant is at its limit).
_TAKE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


class ConnectionSlots:
    def __init__(self, redis: aioredis.Redis, *, limit: int, slot_seconds: float) -> None:
        self.redis = redis
        self.limit = limit
        self.slot_ms = int(slot_seconds * 1000)
        self._take = redis.register_script(_TAKE_SLOT)
        #: The slots this process holds: tenant → slot ids.
        self._held: dict[str, set[str]] = defaultdict(set)

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    async def take(self, tenant: str) -> str | None:
        """A slot id for one more connection of ``tenant``, or None at its limit."""
        slot = secrets.token_hex(8)
        with store_errors():
            taken = await self._take(
                keys=[keys.connections_key(tenant)], args=[slot, now_ms(), self.slot_ms, self.limit]
            )
        if not taken:
            return None
        self._held[tenant].add(slot)
        return slot

    async def give_back(self, tenant: str, slot: str) -> None:
        held = self._held.get(tenant)
        if held is not None:
            held.discard(slot)
            if not held:
                del self._held[tenant]
        # If Redis is away the slot simply expires.
        with contextlib.suppress(redis_errors.RedisError, OSError):
            await self.redis.zrem(keys.connections_key(tenant), slot)

    async def renew_forever(self) -> None:
        """Keep this process's slots alive while their connections are."""
        while True:
            await asyncio.sleep(self.slot_ms / 3000)
            try:
                await self._renew()
            except (redis_errors.RedisError, OSError) as exc:
                logger.warning("could not renew connection slots: %s", exc)

    async def _renew(self) -> None:
        if not self._held:
            return
        until = now_ms() + self.slot_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant, slots in self._held.items():
                key = keys.connections_key(tenant)
                # XX: never revive a slot that expired while Redis was away.
                pipe.zadd(key, dict.fromkeys(slots, until), xx=True)
                pipe.pexpire(key, self.slot_ms)
            await pipe.execute()
