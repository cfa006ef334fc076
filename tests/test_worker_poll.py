"""The worker's queue poll costs the same however many generations are in flight: the jobs
this process runs, and jobs another worker runs, are not re-examined one by one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, result_key_prefix
from redis import exceptions as redis_errors

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


async def test_a_job_whose_start_met_a_redis_blip_is_let_go_and_runs_again(
    redis_server: RedisServer,
    redis: aioredis.Redis,
    arq_pool: ArqRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """arq counts a job's try in a transaction before running it; a connection error
    there left its in-progress key set for the job timeout (an hour), its generation
    queued all that time. The key is let go, and the next poll runs the job."""
    settings = Settings.from_env({"REDIS_URL": redis_server.url})
    worker = create_worker(settings, handle_signals=False)
    worker._pool = arq_pool
    job_id = "blipped-job"
    # A function no worker has: arq runs it at once as a failure, and records that.
    await arq_pool.enqueue_job("no_such_function", _job_id=job_id, _queue_name=keys.QUEUE_NAME)

    blips: list[str] = []
    real_pipeline = arq_pool.pipeline

    def pipeline_that_blips_once(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        async def execute(*e_args: Any, **e_kwargs: Any) -> Any:
            counts_a_try = any(command[0] == "INCRBY" for command, _ in pipe.command_stack)
            if counts_a_try and not blips:
                blips.append(job_id)
                raise redis_errors.ConnectionError("a blip of the store")
            return await real_execute(*e_args, **e_kwargs)

        pipe.execute = execute
        return pipe

    monkeypatch.setattr(arq_pool, "pipeline", pipeline_that_blips_once)

    await worker.start_jobs([job_id.encode()])
    await worker.tasks[job_id]  # ends without raising: the job was let go
    assert blips == [job_id]
    assert not await redis.exists(in_progress_key_prefix + job_id)
    assert await redis.zscore(keys.QUEUE_NAME, job_id) is not None, "still queued"

    await worker.start_jobs([job_id.encode()])
    await worker.tasks[job_id]
    assert await redis.exists(result_key_prefix + job_id), "it ran, and its end is recorded"
    assert await redis.zscore(keys.QUEUE_NAME, job_id) is None
