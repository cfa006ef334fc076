"""Per-tenant limits on concurrent event connections, held across every front-end.

Each open event stream of a tenant holds a *slot*: a member of the sorted set
``sb:conns:<tenant>`` scored by when the slot expires. Taking one is a Lua script that first
drops expired slots, then refuses if the tenant holds ``limit`` already, so the count is
exact across all api processes. A process renews its slots every third of their lifetime
and removes each when its response ends; a process that dies holding slots stops renewing
them, and they expire (``BROKER_CONNECTION_SLOT_SECONDS``) instead of being leaked as a bare
counter would be. Expiry is reckoned on Redis's clock (``TIME`` in the scripts): a front-end
whose clock ran ahead would otherwise drop the live slots of the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import defaultdict

from redis import exceptions as redis_errors

from broker import keys
from broker.generation_log import store_errors
from broker.store_connections import StoreClient
from broker.store_scripts import StoreScript

logger = logging.getLogger("streambroker.api")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: KEYS: the tenant's slot set. ARGV: slot id, slot lifetime (ms), limit.
#: Returns 1 (taken) or 0 (the tenant is at its limit).
_TAKE_SLOT = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

#: KEYS: the tenant's slot set. ARGV: slot lifetime (ms), then the slot ids to renew. ``XX``:
#: a slot that expired while Redis was away is not revived.
_RENEW_SLOTS = (
    _NOW
    + """
local expires = now + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
"""
)


class ConnectionSlots:
    def __init__(self, redis: StoreClient, *, limit: int, slot_seconds: float) -> None:
        self.redis = redis
        self.limit = limit
        self.slot_ms = int(slot_seconds * 1000)
        self._take = StoreScript(redis, _TAKE_SLOT)
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
                keys=[keys.connections_key(tenant)], args=[slot, self.slot_ms, self.limit]
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
        # One round trip for every tenant this process holds slots of. The script's text,
        # not its sha: a Redis Cluster's pipeline does not load scripts a node lacks.
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant, slots in list(self._held.items()):
                pipe.eval(_RENEW_SLOTS, 1, keys.connections_key(tenant), str(self.slot_ms), *slots)
            await pipe.execute()
