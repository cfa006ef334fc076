"""The clients one api process shares across requests, owned by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from api.connection_slots import ConnectionSlots
from api.hub import ReaderHub
from api.model_catalog import ModelCatalog
from broker.generation_log import GenerationLog
from broker.settings import Settings


@dataclass
class Services:
    settings: Settings
    #: The process's bounded Redis pool: the log's reads and writes (and so the job queue).
    redis: aioredis.Redis
    log: GenerationLog
    catalog: ModelCatalog
    #: The process's one reader of live events, shared by every watching client.
    hub: ReaderHub
    #: Per-tenant event connection slots (a no-op without a limit).
    slots: ConnectionSlots

    async def aclose(self) -> None:
        await self.hub.aclose()
        await self.catalog.aclose()
        await self.redis.aclose()
