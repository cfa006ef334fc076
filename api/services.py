"""The clients one api process shares across requests, owned by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from arq.connections import ArqRedis

from api.model_catalog import ModelCatalog
from broker.log import GenerationLog
from broker.settings import Settings


@dataclass
class Services:
    settings: Settings
    #: One Redis client (and pool) for the process: the log's reads and writes and arq's queue.
    queue: ArqRedis
    log: GenerationLog
    catalog: ModelCatalog

    async def aclose(self) -> None:
        await self.catalog.aclose()
        await self.queue.aclose()
