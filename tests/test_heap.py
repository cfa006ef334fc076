"""Start-up objects are frozen out of the cyclic GC's full passes (they are what made the
api's full collections long), in the api and in the worker."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from starlette.testclient import TestClient

from api.app import create_app
from broker.settings import Settings
from tests.support.redis_server import free_port


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # leave the test process as it was


def test_the_api_freezes_its_start_up_objects(unfrozen: None) -> None:
    assert gc.get_freeze_count() == 0
    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{free_port()}"))
    with TestClient(app):
        assert gc.get_freeze_count() > 10_000


@pytest.mark.anyio
async def test_the_worker_freezes_its_start_up_objects(unfrozen: None) -> None:
    from workers.worker import worker_options

    url = f"redis://127.0.0.1:{free_port()}"  # never connected to
    options = worker_options(Settings(redis_url=url))
    ctx: dict[str, object] = {"redis": aioredis.Redis.from_url(url)}
    await options["on_startup"](ctx)
    try:
        assert gc.get_freeze_count() > 10_000
    finally:
        await options["on_shutdown"](ctx)
