"""The worker's queue poll costs the same however many generations are in flight: the jobs
this process runs, and jobs another worker runs, are not re-examined one by one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix

from broker import keys
from broker.settings import Settings
from tests.support.redis_server import RedisServer
from workers.worker import create_worker

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
async def arq_pool(redis_server: RedisServer, redis: aioredis.Redis) -> AsyncIterator[ArqRedis]:
    pool = ArqRedis.from_url(redis_server.url)
    yield pool
    await pool.aclose()


async def watch_calls(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_watch", {}).get("calls", 0))


async def test_a_poll_skips_jobs_running_here_and_elsewhere_but_starts_a_new_one(
    redis_server: RedisServer, redis: aioredis.Redis, arq_pool: ArqRedis
) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_server.url})
    worker = create_worker(settings, handle_signals=False)
    worker._pool = arq_pool  # what Worker.main() would create

    here = [f"here-{i}" for i in range(5)]
    elsewhere = [f"elsewhere-{i}" for i in range(5)]
    new = "new-job"
    queued = [*here, *elsewhere, new]
    await redis.zadd(keys.QUEUE_NAME, {job_id: 1 for job_id in queued})
    for job_id in elsewhere:
        await redis.set(in_progress_key_prefix + job_id, b"1")
    running_here = asyncio.get_running_loop().create_future()
    for job_id in here:
        worker.tasks[job_id] = asyncio.ensure_future(running_here)
    await redis.config_resetstat()

    await worker.start_jobs([job_id.encode() for job_id in queued])

    # arq's own WATCH sequence ran for the new job only (it is started: an unknown job id
    # ends at once as expired), not once for each of the ten in flight.
    assert await watch_calls(redis) == 1
    assert set(worker.tasks) == {*here, new}
    await worker.tasks[new]
    running_here.cancel()
