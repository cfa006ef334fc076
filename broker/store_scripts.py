"""Calling the broker's Lua scripts (``broker.scripts``) on any store: one Redis, the
Sentinels' master, or a Redis Cluster.

redis-py's ``Script`` calls ``EVALSHA`` and, when the node lacks the script, loads it with
``SCRIPT LOAD`` and calls again. On a cluster that load goes to the nodes the client takes
for masters, which after a failover may not include the node the call goes to (a replica
just promoted: script caches are not replicated), and the call fails again, for good.
``StoreScript`` falls back to ``EVAL`` instead: it carries the text, runs wherever the keys
are, and leaves the script in that node's cache, so the next ``EVALSHA`` there succeeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

from broker.store_connections import StoreClient


class StoreScript:
    def __init__(self, redis: StoreClient, text: str) -> None:
        self._redis = redis
        self.text = text
        #: What ``EVALSHA`` names it by (a pipeline may call it by this).
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, *, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        redis: Any = self._redis  # redis-py types the two clients' commands apart
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await redis.eval(self.text, len(keys), *keys, *args)
