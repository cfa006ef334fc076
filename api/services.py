"""The clients one api process shares across requests, owned by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from arq.connections import ArqRedis

from api.hub import ReaderHub
from api.model_catalog import ModelCatalog
from broker.log import GenerationLog
from broker.settings import Settings


@dataclass
class Services:
    settings: Settings
    #: The process's bounded Redis pool: the log's reads and writes and arq's queue.
    queue: ArqRedis
    log: GenerationLog
    catalog: ModelCatalog
    #: The process's one reader of live events, shared by every watching client.
    hub: ReaderHub

    async def aclose(self) -> None:
        await self.hub.aclose()
        await self.catalog.aclose()
        await self.queue.aclose()
