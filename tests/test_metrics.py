"""Prometheus metrics move as the broker works: in one process (the app in-process), and
added up over an api's uvicorn worker processes and served by a worker process."""

from __future__ import annotations

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from tests.support.generations import create, expected_text, finish_as_a_worker
from tests.support.processes import BrokerProcess, Launcher, wait_ready
from tests.support.redis_server import RedisServer, free_port
from tests.support.sse import token_text, watch

BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def client(launch: Launcher) -> TestClient:
    return launch.app(flush=True)


@pytest.mark.redis
def test_the_api_counts_creates_connections_resumes_events_and_endings(
    client: TestClient, redis_server: RedisServer
) -> None:
    before = client.get("/metrics")
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    start = before.text
    stream_id = client.post("/v1/streams", json=BODY).json()["id"]
    finish_as_a_worker(
        redis_server.url, stream_id, "x" * 7, tokens=7
    )  # in this process: the writer counts too
    url = f"/v1/streams/{stream_id}/events"
    for headers in ({}, {"Last-Event-ID": "1"}):
        with client.stream("GET", url, headers=headers) as response:
            response.read()
    end = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return value(end, name, **labels) - value(start, name, **labels)

    assert delta("streambroker_streams_created_total") == 1
    assert delta("streambroker_resumes_total") == 1
    assert delta("streambroker_events_sent_total") == 3 + 2  # all three, then two after id 1
    assert delta("streambroker_tokens_generated_total") == 7
    assert delta("streambroker_streams_finished_total", status="completed") == 1
    assert value(end, "streambroker_event_connections") == value(
        start, "streambroker_event_connections"
    )  # both closed again
    ours = {name for name, _ in samples(end) if not name.startswith(("python_", "process_"))}
    assert ours
    assert all(name.startswith("streambroker_") for name in ours)


@pytest.fixture
def multiprocess_broker(launch: Launcher) -> tuple[str, str]:
    """``streambroker api --workers 2`` and a worker serving its metrics; their URLs."""
    port, metrics_port = free_port(), free_port()
    env = {"REDIS_URL": launch.redis_url, "BROKER_METRICS_PORT": str(metrics_port)}
    api = launch.adopt(
        BrokerProcess(
            "api",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
            env=env,
            name="api2",
        )
    ).start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, check=api._check_alive, describe=api.output)
    launch.worker(env)
    return url, f"http://127.0.0.1:{metrics_port}"


@pytest.mark.anyio
@pytest.mark.e2e
@pytest.mark.redis
async def test_an_api_with_two_processes_adds_up_and_a_worker_serves_its_own(
    multiprocess_broker: tuple[str, str],
) -> None:
    api_url, worker_metrics = multiprocess_broker
    async with httpx.AsyncClient(timeout=30) as client:
        start = (await client.get(f"{api_url}/metrics")).text
        ids = [await create(client, api_url, max_tokens=10, rate=1000, seed=i) for i in range(6)]
        with anyio.fail_after(30):
            for i, stream_id in enumerate(ids):
                seen = await watch(client, api_url, stream_id)
                assert token_text(seen.events) == expected_text(10, seed=i)
        # Whichever process answers, the count is the sum over both.
        for _ in range(6):
            text = (await client.get(f"{api_url}/metrics")).text
            created = value(text, "streambroker_streams_created_total") - value(
                start, "streambroker_streams_created_total"
            )
            assert created == 6
        worker = (await client.get(worker_metrics)).text
    assert value(worker, "streambroker_streams_finished_total", status="completed") >= 6
    assert value(worker, "streambroker_tokens_generated_total") >= 60
    assert value(worker, "streambroker_time_to_first_token_seconds_count") >= 6
    assert value(worker, "streambroker_job_pickup_seconds_count") >= 6
