"""Structured logs of real api and worker processes with ``BROKER_LOG_FORMAT=json``: every
line they write is one JSON object; the access line of each request and each step of a
generation carry the tenant, never an API key or a read token; every uvicorn worker
process logs JSON too."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support.generations import bearer
from tests.support.log_lines import AUTH, KEY, SECRET, TIMESTAMP
from tests.support.processes import ApiProcess, BrokerProcess, Launcher, wait_ready
from tests.support.redis_server import free_port
from tests.support.waiting import eventually

JSON = {"BROKER_LOG_FORMAT": "json"}
BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def json_entries(process: BrokerProcess) -> list[dict[str, Any]]:
    """Every complete line the process wrote, each of which must be one JSON object."""
    entries = []
    for line in process.output().split("\n")[:-1]:  # the last piece may be half written
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"{process.name} wrote a line that is not JSON: {line!r}")
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def wait_for_entries(
    process: BrokerProcess,
    matches: Callable[[dict[str, Any]], bool],
    count: int = 1,
    timeout: float = 20.0,
) -> list[dict[str, Any]]:
    """The lines of ``process`` that ``matches``, once there are ``count`` of them: polled for,
    as lines are written a moment after the HTTP answer a test waits for."""

    def found() -> list[dict[str, Any]]:
        assert process.process is not None
        alive = process.process.poll() is None
        entries = [entry for entry in json_entries(process) if matches(entry)]
        assert alive or len(entries) >= count, f"{process.name} exited:\n{process.output()}"
        return entries if len(entries) >= count else []

    return eventually(
        found,
        timeout=timeout,
        interval=0.05,
        what=lambda: f"{process.name} to log the lines looked for:\n{process.output()}",
    )


def step_of(process: BrokerProcess, step: str, stream_id: str) -> dict[str, Any]:
    (entry,) = wait_for_entries(
        process,
        lambda e: (
            e.get("logger") == "streambroker.generation"
            and e.get("step") == step
            and e.get("stream_id") == stream_id
        ),
    )
    return entry


def request_of(process: BrokerProcess, method: str, path: str) -> dict[str, Any]:
    return wait_for_entries(
        process,
        lambda e: (
            e.get("logger") == "streambroker.access"
            and e.get("method") == method
            and e.get("path") == path
        ),
    )[0]


def read_events(client: httpx.Client, url: str, **params: str) -> list[str]:
    """The ``event:`` types of a whole event stream (it ends after the terminal event)."""
    with client.stream("GET", url, params=params) as response:
        assert response.status_code == 200
        return [line[7:] for line in response.iter_lines() if line.startswith("event: ")]


@pytest.fixture
def processes_json(launch: Launcher) -> tuple[ApiProcess, BrokerProcess]:
    return launch.api({**JSON, **AUTH}), launch.worker(JSON)


@dataclass
class TwoGenerations:
    """What a client did and saw: a generation read to its end with its read token alone,
    and one that failed after two tokens."""

    stream_id: str
    token: str
    events_url: str
    seen: list[str]
    failed_id: str


def run_two_generations(api: ApiProcess) -> TwoGenerations:
    with httpx.Client(base_url=api.url, timeout=30, headers=bearer(KEY)) as client:
        body = {**BODY, "max_tokens": 12, "fake": {"tokens_per_second": 400}}
        created = client.post("/v1/streams", json=body)
        assert created.status_code == 201, created.text
        stream_id, token = created.json()["id"], created.json()["read_token"]
        events_url = f"/v1/streams/{stream_id}/events"
        with httpx.Client(base_url=api.url, timeout=30) as anonymous:  # the token alone
            seen = read_events(anonymous, events_url, token=token)
        assert seen[0] == "metadata"
        assert seen[-1] == "done"

        failing = {**body, "fake": {"tokens_per_second": 400, "fail_after_tokens": 2}}
        failed_id = client.post("/v1/streams", json=failing).json()["id"]
        assert read_events(client, f"/v1/streams/{failed_id}/events")[-1] == "error"
    return TwoGenerations(stream_id, token, events_url, seen, failed_id)


def assert_request_lines(api: ApiProcess, run: TwoGenerations) -> None:
    """The access lines of the create (with the key) and of the watch (with the token)."""
    create = request_of(api, "POST", "/v1/streams")
    assert (create["status"], create["stream_id"]) == (201, run.stream_id)
    assert (create["tenant"], create["auth"]) == ("tenant-a", "key")
    assert create["duration_ms"] > 0
    assert create["level"] == "info"
    watch = request_of(api, "GET", run.events_url)
    assert (watch["status"], watch["stream_id"], watch["tenant"]) == (
        200,
        run.stream_id,
        "tenant-a",
    )
    assert watch["auth"] == "token"
    assert watch["query"] == ["token"]
    assert watch["events"] == len(run.seen)
    assert watch["terminal"] is True
    assert watch["duration_ms"] > 0
    assert watch["bytes_sent"] > 0


def assert_generation_steps(api: ApiProcess, worker: BrokerProcess, run: TwoGenerations) -> None:
    """The steps of the completed generation (created in the api, the rest in the worker),
    with their timings and counts, and the end of the failed one."""
    created_step = step_of(api, "created", run.stream_id)
    started = step_of(worker, "started", run.stream_id)
    first = step_of(worker, "first_token", run.stream_id)
    finished = step_of(worker, "finished", run.stream_id)
    for entry in (created_step, started, first, finished):
        assert entry["tenant"] == "tenant-a"
        assert entry["model"] == "fake"
        assert TIMESTAMP.match(entry["ts"])
    assert (started["attempt"], first["attempt"], finished["attempt"]) == (1, 1, 1)
    assert started["queue_ms"] >= 0
    assert first["ttft_ms"] >= started["queue_ms"]
    assert (finished["status"], finished["finish_reason"]) == ("completed", "stop")
    assert finished["ttft_ms"] == first["ttft_ms"]
    assert finished["tokens"] == 12
    assert finished["tokens_per_second"] > 0
    assert finished["duration_ms"] > 0
    assert finished["events"] == len(run.seen)

    failure = step_of(worker, "finished", run.failed_id)
    assert (failure["status"], failure["error"], failure["level"]) == (
        "failed",
        "fake_failure",
        "warning",
    )
    assert failure["tokens"] == 2


def assert_all_json_and_no_secret(api: ApiProcess, worker: BrokerProcess, token: str) -> None:
    """Every line of both processes, now that all is written, is JSON; none holds the key,
    the read token, the secret that signs it, or an Authorization header."""
    api_output, worker_output = api.output(), worker.output()
    json_entries(api), json_entries(worker)  # every line, once more, now that all is written
    for secret in (KEY, token, SECRET, "Bearer"):
        assert secret not in api_output
        assert secret not in worker_output


@pytest.mark.e2e
@pytest.mark.redis
def test_json_logs_of_real_processes_tell_each_request_and_generation_step(
    processes_json: tuple[ApiProcess, BrokerProcess],
) -> None:
    api, worker = processes_json
    run = run_two_generations(api)
    assert_request_lines(api, run)
    assert_generation_steps(api, worker, run)
    assert any("Starting worker" in e["msg"] for e in json_entries(worker))
    assert_all_json_and_no_secret(api, worker, run.token)


@pytest.mark.e2e
@pytest.mark.redis
def test_every_uvicorn_worker_process_logs_json(launch: Launcher) -> None:
    port = free_port()
    api = launch.adopt(
        BrokerProcess(
            *("api", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"),
            env={"REDIS_URL": launch.redis_url, **JSON},
            name="api-workers",
        )
    ).start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200
    assert request_of(api, "GET", "/v1/models")["status"] == 200
    # Each child process says it started through the configuration uvicorn gave it.
    started = wait_for_entries(
        api, lambda e: e["msg"].startswith("Started server process"), count=2
    )
    assert {e["logger"] for e in started} == {"uvicorn.error"}
    assert not any(e["logger"] == "uvicorn.access" for e in json_entries(api))
