"""A worker's own endpoint (``streambroker worker --port``, ``workers.health``): liveness,
readiness that follows Redis and the worker's shutdown, and metrics that move as it works,
against real processes and a real redis-server."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.generations import create, state
from tests.support.openai_server import OpenAIServer
from tests.support.processes import BrokerProcess, Launcher, WorkerWithEndpoint, run_cli
from tests.support.redis_server import RedisServer, free_port, running_server
from tests.support.sse import watch
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]

#: Routes under which a lost or stopped worker's generation ends instead of continuing.
NO_CONTINUATION = "fake=fake:off,*=openai"


def value(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text; 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def has(text: str, name: str) -> bool:
    return any(s.name == name for f in text_string_to_metric_families(text) for s in f.samples)


async def scrape(client: httpx.AsyncClient, worker: WorkerWithEndpoint) -> str:
    response = await client.get(f"{worker.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def metric_reaches(
    client: httpx.AsyncClient, worker: WorkerWithEndpoint, name: str, at_least: float, **labels: str
) -> str:
    """Scrape until ``name{labels}`` is at least ``at_least``; the last scrape."""

    async def reached() -> str | None:
        text = await scrape(client, worker)
        return text if value(text, name, **labels) >= at_least else None

    return await eventually_async(reached, what=lambda: f"{name}{labels} >= {at_least}")


def endpoint_worker(
    launch: Launcher, redis_url: str, env: dict[str, str] | None = None
) -> WorkerWithEndpoint:
    """A worker with its endpoint, started, stopped with the rest of the test's processes."""
    worker = WorkerWithEndpoint(redis_url, env)
    launch.adopt(worker)
    return worker.start()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, to stop and start without disturbing others."""
    with running_server() as server:
        yield server


async def test_a_worker_serves_liveness_readiness_and_metrics(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    worker = endpoint_worker(launch, launch.redis_url)

    live = await client.get(f"{worker.url}/healthz")
    assert (live.status_code, live.json()) == (200, {"status": "ok"})
    ready = await client.get(f"{worker.url}/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    text = await scrape(client, worker)
    for name in (
        "streambroker_jobs_in_flight",
        "streambroker_queue_depth",
        "streambroker_queue_oldest_age_seconds",
        "streambroker_lease_renewals_total",
        "streambroker_workers_lost_total",
    ):
        assert has(text, name), name
    for kind in ("timeout", "rate_limited", "server_error", "bad_request", "connection", "other"):
        assert has(text, "streambroker_provider_errors_total"), kind
        assert value(text, "streambroker_provider_errors_total", kind=kind) == 0
    assert value(text, "streambroker_store_errors_total", process="worker") == 0
    ours = {
        s.name
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if not s.name.startswith(("python_", "process_"))
    }
    assert all(name.startswith("streambroker_") for name in ours), ours
    # Where a worker's metrics were served before (any path of prometheus-client's server).
    assert has((await client.get(f"{worker.url}/")).text, "streambroker_jobs_in_flight")


async def test_readiness_follows_redis_hung_down_and_back(
    private_redis: RedisServer, launch: Launcher
) -> None:
    worker = endpoint_worker(launch, private_redis.url)
    assert private_redis.process is not None
    # A probe that waited for a hung Redis would take this client's whole timeout.
    async with httpx.AsyncClient(timeout=httpx.Timeout(5)) as client:

        async def readiness(status: int) -> httpx.Response | None:
            response = await client.get(f"{worker.url}/readyz")
            return response if response.status_code == status else None

        assert await readiness(200)

        # Hung: the connections stay open, nothing answers. 503 within the probe's bound.
        private_redis.process.send_signal(signal.SIGSTOP)
        try:
            hung = await eventually_async(lambda: readiness(503))
            assert hung.json()["error"]["code"] == "store_unavailable"
            assert hung.headers["retry-after"] == "1"
        finally:
            private_redis.process.send_signal(signal.SIGCONT)
        await eventually_async(lambda: readiness(200))

        # Down: refused connections. The worker stays alive (its poll backs off), not ready.
        private_redis.kill()
        down = await eventually_async(lambda: readiness(503))
        assert down.json()["error"]["code"] == "store_unavailable"
        assert "Redis does not answer" in down.json()["error"]["message"]
        live = await client.get(f"{worker.url}/healthz")
        assert (live.status_code, live.json()) == (200, {"status": "ok"})
        errors = await metric_reaches(
            client, worker, "streambroker_store_errors_total", 1, process="worker"
        )
        # The queue cannot be read: its figures are left out rather than shown stale.
        assert not has(errors, "streambroker_queue_depth")

        private_redis.start()
        await eventually_async(lambda: readiness(200))
        assert worker.process is not None
        assert worker.process.poll() is None


async def test_a_stopping_worker_drains_while_it_ends_its_jobs(
    private_redis: RedisServer, launch: Launcher, client: httpx.AsyncClient
) -> None:
    """SIGTERM: ``/readyz`` and ``/healthz`` answer draining at once, while the worker ends
    the generation it runs (held up here by a Redis that does not answer), then it exits
    and its generation ended with ``worker_stopped``."""
    # No sweeper may end it while Redis is stopped; and the fake's route does not continue
    # generations here, so that the stop ends it (the hand-over: test_continuation_e2e).
    env = {"BROKER_LEASE_SECONDS": "30", "BROKER_ROUTES": NO_CONTINUATION}
    api = launch.api(env, redis_url=private_redis.url)
    worker = endpoint_worker(launch, private_redis.url, env)
    stream_id = await create(client, api.url, max_tokens=2000, rate=20)
    await metric_reaches(client, worker, "streambroker_jobs_in_flight", 1)
    assert (await client.get(f"{worker.url}/readyz")).status_code == 200
    assert private_redis.process is not None
    assert worker.process is not None

    private_redis.process.send_signal(signal.SIGSTOP)
    try:
        worker.process.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            response = await client.get(f"{worker.url}/readyz")
            return response.status_code == 503 and response.json() == {"status": "draining"}

        await eventually_async(draining)
        live = await client.get(f"{worker.url}/healthz")
        assert (live.status_code, live.json()) == (503, {"status": "draining"})
        assert worker.process.poll() is None, "still ending its generation"
    finally:
        private_redis.process.send_signal(signal.SIGCONT)

    process = worker.process
    assert await anyio.to_thread.run_sync(lambda: process.wait(30)) == 0
    with anyio.fail_after(30):
        seen = await watch(client, api.url, stream_id)
    assert seen.events[-1].type == "error"
    assert seen.events[-1].data["code"] == "worker_stopped"
    with pytest.raises(httpx.TransportError):
        await client.get(f"{worker.url}/healthz")


async def test_jobs_in_flight_queue_depth_pickup_and_renewals(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    """A worker that runs one job at a time: the running one counts in flight and is not
    waiting; those behind it are the queue's depth, the oldest aging."""
    launch.flush()
    api = launch.api()
    worker = endpoint_worker(launch, launch.redis_url, {"BROKER_MAX_JOBS": "1"})
    before = await scrape(client, worker)
    assert value(before, "streambroker_jobs_in_flight") == 0
    assert value(before, "streambroker_queue_depth") == 0

    running = await create(client, api.url, max_tokens=2000, rate=20)
    await metric_reaches(client, worker, "streambroker_jobs_in_flight", 1)
    waiting = [await create(client, api.url, max_tokens=5, rate=1000, seed=i) for i in range(3)]

    async def queue_of_three() -> str | None:
        text = await scrape(client, worker)
        return text if value(text, "streambroker_queue_depth") == 3 else None

    text = await eventually_async(queue_of_three)
    assert value(text, "streambroker_jobs_in_flight") == 1  # the running job is not waiting
    assert value(text, "streambroker_queue_oldest_age_seconds") > 0
    assert value(text, "streambroker_job_pickup_seconds_count") >= 1
    # It renews its lease while it runs (every 0.2 s: BROKER_CANCEL_POLL_MS).
    await metric_reaches(client, worker, "streambroker_lease_renewals_total", 2)

    assert (await client.post(f"{api.url}/v1/streams/{running}/cancel")).status_code == 202
    with anyio.fail_after(30):
        for stream_id in waiting:
            assert (await watch(client, api.url, stream_id)).ended

    async def idle() -> str | None:
        text = await scrape(client, worker)
        quiet = value(text, "streambroker_jobs_in_flight") == 0
        return text if quiet and value(text, "streambroker_queue_depth") == 0 else None

    text = await eventually_async(idle)
    assert value(text, "streambroker_queue_oldest_age_seconds") == 0
    assert value(text, "streambroker_job_pickup_seconds_count") >= 4


async def test_provider_errors_are_counted_by_kind(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    with OpenAIServer() as upstream:
        env = {
            "OPENAI_BASE_URL": upstream.base_url,
            "BROKER_UPSTREAM_MAX_RETRIES": "0",
            "BROKER_MODELS": "error-429,error-400,error-503",
        }
        api = launch.api(env)
        worker = endpoint_worker(launch, launch.redis_url, env)
        start = await scrape(client, worker)
        kinds = {
            "error-429": "rate_limited",
            "error-400": "bad_request",
            "error-503": "server_error",
        }
        for model in kinds:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            stream_id = (await client.post(f"{api.url}/v1/streams", json=body)).json()["id"]
            with anyio.fail_after(30):
                assert (await watch(client, api.url, stream_id)).events[-1].type == "error"
        fake_failure = await create(client, api.url, max_tokens=5, fail_after_tokens=2)
        with anyio.fail_after(30):
            assert (await watch(client, api.url, fake_failure)).events[-1].type == "error"
        expected = {
            "rate_limited": 1,
            "bad_request": 1,
            "server_error": 1,
            "other": 1,  # the fake model's requested failure
            "timeout": 0,
            "connection": 0,
        }
        name = "streambroker_provider_errors_total"

        async def as_expected() -> bool:
            # Counted just after the error is appended: a reader may see the error first.
            end = await scrape(client, worker)
            found = {k: value(end, name, kind=k) - value(start, name, kind=k) for k in expected}
            return found == expected

        await eventually_async(as_expected, what=lambda: f"provider errors by kind: {expected}")


async def test_a_sweep_that_ends_a_dead_workers_generation_is_counted(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    """A worker killed mid-generation: another worker's sweeper takes it over once the
    lease lapses, and counts a take-over (``worker_lost``) and a lost worker."""
    launch.flush()
    # The api's sweeper sweeps once at start, then not for ten minutes: the worker's sweeps.
    api = launch.api({"BROKER_SWEEP_SECONDS": "600", "BROKER_ROUTES": NO_CONTINUATION})
    doomed = launch.worker({"BROKER_LEASE_SECONDS": "1", "BROKER_ROUTES": NO_CONTINUATION})
    stream_id = await create(client, api.url, max_tokens=2000, rate=20)

    async def running() -> bool:
        return (await state(client, api.url, stream_id))["status"] == "running"

    await eventually_async(running)
    assert doomed.process is not None
    doomed.process.kill()
    doomed.process.wait(10)

    sweeper = endpoint_worker(
        launch, launch.redis_url, {"BROKER_SWEEP_SECONDS": "0.1", "BROKER_ROUTES": NO_CONTINUATION}
    )
    name = "streambroker_lease_takeovers_total"
    text = await metric_reaches(client, sweeper, name, 1, outcome="worker_lost")
    assert value(text, name, outcome="worker_lost") == 1
    assert value(text, "streambroker_workers_lost_total") == 1
    assert value(text, name, outcome="queue_timeout") == 0
    # The dead worker's job is still in arq's queue, as running: not waiting.
    assert value(text, "streambroker_queue_depth") == 0
    with anyio.fail_after(30):
        seen = await watch(client, api.url, stream_id)
    assert seen.events[-1].data["code"] == "worker_lost"


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("how", ["--port", "BROKER_METRICS_PORT"])
def test_a_port_already_taken_stops_the_worker_with_one_line(how: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}", "BROKER_METRICS_HOST": "127.0.0.1"}
        args = ["worker"]
        if how == "--port":
            args += ["--port", str(port)]
        else:
            env["BROKER_METRICS_PORT"] = str(port)
        line = one_line_error(run_cli(*args, env=env, text=True, timeout=30))
    assert f"127.0.0.1:{port}" in line
    assert "--port" in line
    assert "BROKER_METRICS_PORT" in line


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "65536"], {}, "--port"),
        (["--port", "nine"], {}, "--port"),
        (["--port", "-1"], {}, "--port"),
        ([], {"BROKER_METRICS_PORT": "70000"}, "BROKER_METRICS_PORT"),
        ([], {"BROKER_METRICS_HOST": "not a host"}, "BROKER_METRICS_HOST"),
        ([], {"BROKER_METRICS_HOST": "10.0.0.300"}, "BROKER_METRICS_HOST"),
    ],
)
def test_bad_endpoint_options_give_one_line(
    args: list[str], env: dict[str, str], named: str
) -> None:
    result = run_cli(
        "worker", *args, env={"REDIS_URL": "redis://127.0.0.1:1", **env}, text=True, timeout=30
    )
    assert named in one_line_error(result)


def test_port_0_overrides_the_setting_and_serves_nothing(launch: Launcher) -> None:
    port = free_port()
    env = {
        "REDIS_URL": launch.redis_url,
        "BROKER_METRICS_PORT": str(port),
        "BROKER_METRICS_HOST": "127.0.0.1",
    }
    worker = launch.adopt(BrokerProcess("worker", "--port", "0", env=env, name="worker")).start()
    worker.wait_for_output("Starting worker")
    assert "health and metrics on" not in worker.output()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
