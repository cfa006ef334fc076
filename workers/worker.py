"""The arq worker: its settings, and the shared runtime built once per process.

``WorkerSettings`` (for ``arq workers.worker.WorkerSettings``) is thin: everything comes from
``broker.settings``. Queue polling is lowered from arq's 0.5 s to ``BROKER_JOB_POLL_SECONDS``
so that picking a job up adds little to time-to-first-token.

With ``BROKER_METRICS_PORT`` (or ``streambroker worker --port``) a worker serves
``/healthz``, ``/readyz`` and ``/metrics`` (``workers.health``): every turn of its queue poll
is a heartbeat, and from the moment it is told to stop it answers ``/readyz`` as draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
from typing import Any

import arq.worker as arq_worker
from arq import Worker
from arq.connections import ArqRedis, RedisSettings
from arq.constants import in_progress_key_prefix
from arq.worker import func

from broker import keys, metrics, store_connections
from broker.cluster_connections import (
    COMMAND_TIMEOUT_SECONDS,
    cluster_client,
    control_slot_pool,
)
from broker.gc_tuning import freeze_startup_objects
from broker.generation_log import GenerationLog
from broker.jobs import GENERATE_JOB
from broker.log_errors import means_store_unavailable
from broker.pg_archive.archiver import Archiver
from broker.pg_archive.store import connect_archive
from broker.settings import Settings
from broker.store_connections import StoreClient
from broker.store_url import StoreAddress, parse_store_url
from broker.sweeper import LeaseSweeper
from workers.generate import WorkerRuntime, generate
from workers.health import HealthServer, WorkerHealth, listen
from workers.providers import Providers

#: Back-off of the queue poll while Redis is unreachable. At most a second: a failover
#: takes a few, and the jobs queued meanwhile should start as soon as it is over.
STORE_RETRY_MIN_SECONDS = 0.1
STORE_RETRY_MAX_SECONDS = 1.0
#: At start-up, how often and how far apart Redis is tried before the worker gives up (as
#: arq's own ``create_pool`` does).
START_TRIES = 6
START_RETRY_SECONDS = 1.0

# arq names its abort set with a constant, not a setting; its worker reads that name from
# its own module at every use. Moved into the control slot with arq's other keys: on a Redis
# Cluster the transactions that start and finish a job would otherwise span two slots.
arq_worker.abort_jobs_ss = keys.ARQ_ABORT_KEY  # type: ignore[attr-defined]

#: How a worker's connections show in Redis's CLIENT LIST.
WORKER_CLIENT_NAME = "streambroker-worker"

logger = logging.getLogger("streambroker.worker")

#: Runs arq gives a job (after a crash, or ``CLAIM_RIDE_OUT_SECONDS`` of Redis away at claim).
JOB_TRIES = 20

#: How long arq keeps a job's return value (a short status string) for inspection.
KEEP_RESULT_SECONDS = 300

#: Where a ``BrokerWorker`` leaves its ``WorkerHealth`` in arq's job context.
HEALTH = "health"

#: On SIGTERM/SIGINT, how long the jobs have to hand their generations over before they are
#: cancelled (a hand-over is a few Redis round trips; a job riding out a Redis outage may not
#: make it, and then ends its generation with ``worker_stopped`` as before).
HAND_OVER_GRACE_SECONDS = 10.0


def store_address(settings: Settings) -> StoreAddress:
    return parse_store_url(
        settings.require_redis_url("a worker needs the Redis it shares with the api")
    )


def redis_settings(settings: Settings) -> RedisSettings:
    """For arq's own command line; ``create_worker`` hands arq a pool of its own instead."""
    return store_connections.arq_redis_settings(store_address(settings))


def redis_pool(settings: Settings) -> ArqRedis:
    """arq's client (``broker.store_connections``: behind Sentinel, its connections follow
    the master). On a Redis Cluster, connections to the master of the control slot, where
    every key of arq's lives (``broker.cluster_connections``). Nothing connects before the
    worker starts."""
    address = store_address(settings)
    if address.cluster is not None:
        pool = control_slot_pool(address.cluster, client_name=WORKER_CLIENT_NAME)
    else:
        pool = store_connections.pool(
            address, client_name=WORKER_CLIENT_NAME, command_timeout=command_timeout(settings)
        )
    return ArqRedis(pool, default_queue_name=keys.QUEUE_NAME)


def log_client(settings: Settings, arq_redis: ArqRedis) -> StoreClient:
    """The client the generations are written through: arq's own on one Redis, the
    cluster client on a cluster (a generation's keys live in its own slot, not arq's)."""
    address = store_address(settings)
    if address.cluster is not None:
        return cluster_client(
            address.cluster,
            client_name=WORKER_CLIENT_NAME,
            command_timeout=command_timeout(settings),
        )
    return arq_redis


def command_timeout(settings: Settings) -> float:
    """Longest a worker's command waits for its reply: ``COMMAND_TIMEOUT_SECONDS``, and an
    append may wait for replicas (``WAIT``) on top of its own time."""
    return COMMAND_TIMEOUT_SECONDS + settings.generation.append_wait_timeout_ms / 1000


def worker_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker`` (also the attributes of ``WorkerSettings``)."""
    gen = settings.generation

    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["log_client"] = log_client(settings, ctx["redis"])
        runtime = ctx["runtime"] = _runtime(ctx["log_client"], settings)
        runtime.providers.warm()
        if settings.archive.archive_url:
            # Before the sweeper starts: a generation it ends must go to the archive's due
            # set, which its ``ended`` step does only once the log knows the archive.
            runtime.log.archive = await connect_archive(settings.archive)
        sweeper = LeaseSweeper.from_settings(runtime.log, owner=runtime.worker_id, settings=gen)
        ctx["sweeper"] = asyncio.create_task(sweeper.run(gen.sweep_seconds), name="lease-sweeper")
        if runtime.log.archive is not None:
            archiver = Archiver(
                runtime.log,
                runtime.log.archive,
                after_seconds=settings.archive.archive_after_seconds,
                retention_seconds=settings.archive.archive_retention_seconds,
            )
            ctx["archiver"] = asyncio.create_task(archiver.run(gen.sweep_seconds), name="archiver")
        health = ctx.get(HEALTH)
        if health is None and gen.metrics_port:
            # arq's own command line runs a plain arq Worker, whose poll cannot be watched:
            # its endpoint is served from here, /healthz saying only that the loop answers.
            health = WorkerHealth(watches_poll=False)
            ctx["health_server"] = HealthServer(health, listen(gen.metrics_host, gen.metrics_port))
            await ctx["health_server"].start()
        if health is not None:
            health.watch(ctx["redis"], ctx["log_client"])
        freeze_startup_objects()

    return {
        # Each generation runs once per claim; a retry after a crash is a new fenced attempt.
        # arq drops a job past its tries and leaves its generation queued, so they are many:
        # what ends a generation is its own state (a run of one that ended does nothing),
        # and a claim rides out a Redis outage for a while before it spends a try.
        "functions": [func(generate, name=GENERATE_JOB, max_tries=JOB_TRIES)],
        "queue_name": keys.QUEUE_NAME,
        "on_startup": on_startup,
        "on_shutdown": _on_shutdown,
        "poll_delay": gen.job_poll_seconds,
        "max_jobs": gen.max_jobs,
        "job_timeout": gen.job_timeout_seconds,
        "keep_result": KEEP_RESULT_SECONDS,
    }


def _runtime(redis: StoreClient, settings: Settings) -> WorkerRuntime:
    """What every job of this process shares."""
    gen = settings.generation
    return WorkerRuntime(
        log=GenerationLog.from_settings(redis, gen),
        providers=Providers(gen, settings.upstream),
        settings=gen,
        worker_id=f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(4)}",
    )


async def _on_shutdown(ctx: dict[str, Any]) -> None:
    """Undo ``on_startup``, whatever part of it ran."""
    server = ctx.get("health_server")
    if server is not None:
        await server.stop()
    for name in ("sweeper", "archiver"):
        loop_task = ctx.get(name)
        if loop_task is not None:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
    runtime = ctx.get("runtime")
    if runtime is not None:
        await runtime.providers.aclose()
        if runtime.log.archive is not None:
            await runtime.log.archive.close()
    client = ctx.get("log_client")
    if client is not None and client is not ctx.get("redis"):
        await client.aclose()


class BrokerWorker(Worker):
    """arq's ``Worker`` without a poll whose cost grows with the jobs in flight.

    arq leaves a job in its queue while the job runs, and every poll re-examines each queued
    id with a ``WATCH``/``EXISTS``/``ZSCORE`` sequence of round trips, one id after another:
    the ids this process is running itself, and those other workers are running. With a
    short poll and a few dozen generations in flight, that costs much of a worker's CPU and
    thousands of Redis calls a second, and a new job waits behind the re-checks
    (infra/bench/results/fanout.md has the pickup latency with and without this).

    Here a poll drops the ids this process is running, and the ids whose in-progress key
    exists (running elsewhere) with one pipelined ``EXISTS`` for all of them; arq's own
    checks then run only for jobs that may really be startable, and still decide.

    It also keeps its ``WorkerHealth`` (``workers.health``) and serves it on
    ``health_listener`` when given one: from the start of ``main`` (``/readyz`` is 503 while
    Redis is awaited) until ``close`` has ended the jobs.

    And on SIGTERM or SIGINT it hands its generations over instead of ending them: it stops
    taking jobs, tells every job to hand over (``WorkerRuntime.stop``: the current batch is
    appended, then a continuation is queued, which another worker picks up at once), waits
    up to ``HAND_OVER_GRACE_SECONDS`` for them, and only then stops as arq does. A second
    signal stops it at once.
    """

    _store_retry = STORE_RETRY_MIN_SECONDS
    #: Set by the first SIGTERM/SIGINT: the jobs are handing over.
    _handing_over: asyncio.Task[None] | None = None
    #: Set once the worker stops as arq does (its main task cancelled).
    _stopped = False

    def __init__(
        self, *args: Any, health_listener: socket.socket | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.health = WorkerHealth()
        if self._pool is not None:
            self.health.watch(self._pool)
        self.ctx[HEALTH] = self.health  # on_startup adds the generations' client
        # arq calls it once it has cancelled the jobs (SIGINT, SIGTERM, close()).
        self.on_stop = lambda _signal: self.health.drain()
        self._health_server = None
        if health_listener is not None:
            self._health_server = HealthServer(self.health, health_listener)

    def handle_sig(self, signum: int) -> None:
        runtime: WorkerRuntime | None = self.ctx.get("runtime")
        hands_over = signum in (signal.SIGTERM, signal.SIGINT) and runtime is not None
        if not hands_over or self._handing_over is not None:
            self._stop(signum)
            return
        assert runtime is not None
        logger.info(
            "shutdown on %s: handing %d jobs over", signal.Signals(signum).name, len(self.tasks)
        )
        self.allow_pick_jobs = False
        self.health.drain()
        runtime.stop()
        self._handing_over = asyncio.ensure_future(self._stop_after_hand_over(signum))

    async def _stop_after_hand_over(self, signum: int) -> None:
        """Let the jobs hand over (``HAND_OVER_GRACE_SECONDS`` at most), then stop as arq does.
        Jobs a poll was already starting when the signal came start after it: they find the
        worker stopping and hand over at once, and are waited for too."""
        deadline = asyncio.get_running_loop().time() + HAND_OVER_GRACE_SECONDS
        while running := [task for task in self.tasks.values() if not task.done()]:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            await asyncio.wait(running, timeout=left)
        self._stop(signum)

    def _stop(self, signum: int) -> None:
        """Stop as arq does: cancel the jobs and the main task. A cancel that lands in arq's
        start-up Redis calls can be lost there (seen: a SIGTERM just after "Starting worker"
        left the worker polling for good, taking no jobs and never exiting): the next poll
        ends it instead (``_poll_iteration``)."""
        self._stopped = True
        super().handle_sig(signum)  # type: ignore[arg-type]

    async def main(self) -> None:
        """arq's ``main``, once Redis answers: with a pool of our own (``create_worker``),
        arq does not wait for Redis at start-up itself."""
        if self._health_server is not None:
            await self._health_server.start()
        if self._pool is not None:
            await _wait_for_store(self._pool)
        await super().main()

    async def close(self) -> None:
        """arq's ``close`` (the jobs end, its health-check key goes, ``on_shutdown`` runs),
        draining all along; then the endpoint stops.

        Unlike arq's, a Redis that is away does not stop it half-way (arq's raises from the
        key's delete, before ``on_shutdown``): the key is left to expire, as arq sets it to,
        and the rest runs, so a stop that was asked for ends as a clean exit, never as a
        failure a supervisor would restart or page about."""
        self.health.drain()
        try:
            if not self._handle_signals:
                self.handle_sig(signal.SIGUSR1)
            if not self._pool:
                return
            await asyncio.gather(*self.tasks.values())
            try:
                await self.pool.delete(self.health_check_key)
            except Exception as exc:
                if not _store_is_away(exc):
                    raise
                logger.warning("Redis away at shutdown (%s); its health-check key expires", exc)
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
            await self.pool.close(close_connection_pool=True)
            self._pool = None
        finally:
            if self._health_server is not None:
                await self._health_server.stop()

    async def _poll_iteration(self) -> None:
        """arq's poll, surviving a Redis outage.

        arq lets a connection error out of its poll, which ends ``Worker.main`` and so the
        process: under a supervisor, a crash loop for as long as Redis is away. Here the
        poll backs off (doubling up to ``STORE_RETRY_MAX_SECONDS``) and carries on; the
        jobs already running keep retrying their own writes meanwhile. A store that takes
        no writes now (a replica, a master cut off from its replicas: a failover) is away
        as much as one that does not answer.
        """
        if self._stopped:
            raise asyncio.CancelledError  # a stop whose cancel was lost (``_stop``)
        self.health.beat()
        try:
            await super()._poll_iteration()
        except Exception as exc:
            if not _store_is_away(exc):
                raise
            metrics.count_store_error()
            logger.warning(
                "Redis unreachable (%s); polling the queue again in %.1fs", exc, self._store_retry
            )
            await asyncio.sleep(self._store_retry)
            self._store_retry = min(self._store_retry * 2, STORE_RETRY_MAX_SECONDS)
        else:
            if self._store_retry != STORE_RETRY_MIN_SECONDS:
                logger.info("Redis reachable again; polling the queue")
                self._store_retry = STORE_RETRY_MIN_SECONDS

    async def run_job(self, job_id: str, score: int) -> None:
        """arq's ``run_job``, letting go of a job when Redis failed around it.

        Before it runs a job, arq reads it and counts the try in one transaction; after,
        it records the result in another. It lets a connection error out of either with
        the job's in-progress key still set, and that key keeps every worker off the job
        until it expires: the job timeout plus 10 s, an hour by default, all that time
        with its generation queued and no error anywhere. A blip of the store at that
        moment is enough (a failover that moves the control slot). Here the key is
        dropped instead, so a poll runs the job again soon; a run of a generation that
        already ran does nothing (its claim finds it ended), and none runs twice at once:
        this worker's run is over, and no other started it while the key was held.
        """
        try:
            await super().run_job(job_id, score)
        except Exception as exc:
            if not _store_is_away(exc):
                raise
            logger.warning("job %s: Redis failed around it (%s); letting it run again", job_id, exc)
            await self._let_go(job_id)

    async def _let_go(self, job_id: str) -> None:
        """Delete the job's in-progress key, retrying while Redis is away (for as long
        as a start-up waits for it); if it never comes back, the key expires in time."""
        delay = STORE_RETRY_MIN_SECONDS
        for _ in range(START_TRIES * 2):
            try:
                await self.pool.delete(in_progress_key_prefix + job_id)
                return
            except Exception as exc:
                if not _store_is_away(exc):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX_SECONDS)
        logger.error("job %s: held until its in-progress key expires (Redis away)", job_id)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        if self._handing_over is not None:
            return  # stopping: the jobs are other workers' now
        candidates = [
            job_id
            for job_id in job_ids
            if (task := self.tasks.get(job_id.decode())) is None or task.done()
        ]
        if len(candidates) > 1:
            async with self.pool.pipeline(transaction=False) as pipe:
                for job_id in candidates:
                    pipe.exists(in_progress_key_prefix + job_id.decode())
                running_elsewhere = await pipe.execute()
            candidates = [
                job_id
                for job_id, running in zip(candidates, running_elsewhere, strict=True)
                if not running
            ]
        await super().start_jobs(candidates)


def create_worker(
    settings: Settings, *, handle_signals: bool = True, health_port: int | None = None
) -> BrokerWorker:
    """The worker; it serves its endpoint on ``health_port``, else on
    ``BROKER_METRICS_PORT``, unless that is 0. The port is taken here: one that another
    process holds raises ``ConfigError`` before anything else starts."""
    metrics.set_process_role("worker")
    gen = settings.generation
    port = gen.metrics_port if health_port is None else health_port
    listener = listen(gen.metrics_host, port) if port else None
    return BrokerWorker(
        handle_signals=handle_signals,
        redis_pool=redis_pool(settings),
        health_listener=listener,
        **worker_options(settings),
    )


def _store_is_away(exc: Exception) -> bool:
    """Redis cannot take commands now (down, unreachable, read-only), but may soon."""
    return means_store_unavailable(exc) or isinstance(exc, OSError)


async def _wait_for_store(redis: ArqRedis) -> None:
    """Return once Redis answers a ``PING``; after ``START_TRIES`` failures, raise the last."""
    for tries_left in range(START_TRIES - 1, -1, -1):
        try:
            await redis.ping()
            return
        except Exception as exc:
            if not tries_left or not _store_is_away(exc):
                raise
            logger.warning(
                "Redis unreachable (%s); trying again in %.0fs, %d tries left",
                exc,
                START_RETRY_SECONDS,
                tries_left,
            )
            await asyncio.sleep(START_RETRY_SECONDS)


async def _log_store_without_info(redis: Any, log_func: Any) -> None:
    log_func("store: in-process fakeredis (no INFO to report)")


def tolerate_store_without_info() -> None:
    """Let arq start against fakeredis, which has no ``INFO`` command.

    arq calls ``INFO`` once at start-up, only to log the server's version and memory; on
    fakeredis (the store of ``streambroker dev`` without redis-server) that call fails and
    the worker stops. Only ``dev`` calls this, and only for that store.
    """
    arq_worker.log_redis_info = _log_store_without_info  # type: ignore[attr-defined]


def __getattr__(name: str) -> Any:
    """``WorkerSettings`` for arq's own CLI (``arq workers.worker.WorkerSettings``), built from
    the environment only when asked for, so importing this module never needs ``REDIS_URL``."""
    if name == "WorkerSettings":
        settings = Settings.from_env(os.environ)
        metrics.set_process_role("worker")
        options = {**worker_options(settings), "redis_settings": redis_settings(settings)}
        return type("WorkerSettings", (), options)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
