"""The clients one api process shares across requests, owned by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from api.connection_slots import ConnectionSlots
from api.hub import ReaderHub
from api.model_catalog import ModelCatalog
from api.shared_reads import SharedReads
from broker.generation_log import GenerationLog
from broker.settings import Settings
from broker.store_connections import StoreClient


@dataclass
class Services:
    settings: Settings
    #: The process's bounded Redis client: the log's reads and writes (and the job queue).
    redis: StoreClient
    log: GenerationLog
    catalog: ModelCatalog
    #: The process's one reader of live events, shared by every watching client.
    hub: ReaderHub
    #: Per-tenant event connection slots (a no-op without a limit).
    slots: ConnectionSlots
    #: Catch-up reads shared by the clients that ask for the same page at once.
    catch_up: SharedReads

    async def aclose(self) -> None:
        await self.hub.aclose()
        await self.catalog.aclose()
        await self.redis.aclose()
