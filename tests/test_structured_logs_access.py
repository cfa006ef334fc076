"""Structured logs in process: the access log middleware (one line per request, with the
names of known query parameters and never a secret; failures as 500 with the error type;
probes at debug level), and the lines of the real app and of a sweep: the tenant of each
request and the lifecycle steps of a generation, never an API key or a read token."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from api.access_log import MAX_PATH, AccessLog
from broker.events import Event, EventType
from broker.generation_log import GenerationLog
from broker.state import now_ms
from broker.structured_logs import JsonFormatter
from broker.sweeper import LeaseSweeper
from tests.support.generations import bearer, claimed, create_stream
from tests.support.log_lines import AUTH, KEY, SECRET
from tests.support.processes import Launcher


def access_entries(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [as_json(r) for r in caplog.records if r.name == "streambroker.access"]


def step_entries(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [as_json(r) for r in caplog.records if r.name == "streambroker.generation"]


def as_json(record: logging.LogRecord) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(JsonFormatter().format(record))
    return entry


@pytest.fixture
def small_app() -> Starlette:
    async def hello(request: Request) -> Response:
        return PlainTextResponse("hello")

    async def broken(request: Request) -> Response:
        raise RuntimeError("bug")

    return Starlette(
        routes=[Route("/hello", hello), Route("/broken", broken), Route("/readyz", hello)],
        middleware=[Middleware(AccessLog)],
    )


def test_a_request_line_has_names_of_known_parameters_and_no_secret(
    small_app: Starlette, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with TestClient(small_app) as client:
        response = client.get(
            "/hello?token=tok-SECRET-1&last_event_id=3&sk-SECRET-2=1&metadata.user=bob&replay=2",
            headers={"Authorization": "Bearer SECRET-3"},
        )
    assert response.status_code == 200
    (entry,) = access_entries(caplog)
    assert entry["msg"] == "GET /hello 200"
    assert entry["method"] == "GET"
    assert entry["path"] == "/hello"
    assert entry["query"] == ["token", "last_event_id", "?", "metadata.*", "replay"]
    assert entry["status"] == 200
    assert entry["bytes_sent"] == len("hello")
    assert entry["duration_ms"] >= 0
    assert entry["client"].startswith("testclient:")
    line = JsonFormatter().format(caplog.records[-1])
    assert "SECRET" not in line
    assert "bob" not in line


def test_a_failed_request_is_logged_as_500_with_the_error_type(
    small_app: Starlette, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with TestClient(small_app, raise_server_exceptions=False) as client:
        assert client.get("/broken").status_code == 500
        assert client.get("/x" * 500).status_code == 404
    broken, long = access_entries(caplog)
    assert (broken["status"], broken["error"], broken["level"]) == (500, "RuntimeError", "warning")
    assert long["status"] == 404
    assert len(long["path"]) == MAX_PATH + 1


def test_probes_are_logged_at_debug_level(
    small_app: Starlette, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with TestClient(small_app) as client:
        assert client.get("/readyz").status_code == 200
        assert client.get("/hello").status_code == 200
    assert [(e["path"], e["level"]) for e in access_entries(caplog)] == [
        ("/readyz", "debug"),
        ("/hello", "info"),
    ]


@pytest.mark.redis
def test_the_api_logs_tenants_and_the_steps_of_a_cancelled_queued_generation(
    launch: Launcher, caplog: pytest.LogCaptureFixture
) -> None:
    """No worker runs here: the cancel ends the queued generation in the api itself."""
    caplog.set_level(logging.INFO)
    client = launch.app(AUTH)
    created = create_stream(client, key=KEY)
    stream_id, token = created["id"], created["read_token"]
    cancel = client.post(f"/v1/streams/{stream_id}/cancel", headers=bearer(KEY))
    assert cancel.status_code == 202  # it was queued when asked
    url = f"/v1/streams/{stream_id}/events"
    with client.stream("GET", url, params={"token": token}) as response:
        body = response.read().decode()
    assert "event: done" in body

    create_line, cancel_line, events_line = access_entries(caplog)
    assert create_line["status"] == 201
    assert create_line["stream_id"] == stream_id
    assert (create_line["tenant"], create_line["auth"]) == ("tenant-a", "key")
    assert cancel_line["stream_id"] == stream_id
    assert cancel_line["tenant"] == "tenant-a"
    assert events_line["stream_id"] == stream_id
    assert (events_line["tenant"], events_line["auth"]) == ("tenant-a", "token")
    assert events_line["query"] == ["token"]
    assert (events_line["events"], events_line["last_event_id"]) == (2, 2)  # metadata, done
    assert events_line["terminal"] is True

    steps = {e["step"]: e for e in step_entries(caplog)}
    assert list(steps) == ["created", "cancel_requested", "finished"]
    assert all(e["stream_id"] == stream_id for e in steps.values())
    assert all(e["tenant"] == "tenant-a" for e in steps.values())
    assert steps["created"]["model"] == "fake"
    assert steps["cancel_requested"]["was_status"] == "queued"
    assert steps["finished"]["status"] == "cancelled"
    assert steps["finished"]["finish_reason"] == "cancelled"

    # What the app logged; the test client's own log lines show the URLs it asked for.
    logged = [r for r in caplog.records if not r.name.startswith("httpx")]
    everything = "\n".join(JsonFormatter().format(r) for r in logged)
    assert KEY not in everything
    assert token not in everything
    assert SECRET not in everything


@pytest.mark.anyio
@pytest.mark.redis
async def test_a_sweep_logs_the_take_over_and_the_end(
    redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    log = GenerationLog(redis, retention_seconds=600)
    stream_id, writer = await claimed(log, lease_seconds=5, tenant="tenant-b")
    await writer.append(Event(EventType.METADATA, {"id": stream_id}, t=0))
    sweeper = LeaseSweeper(log, owner="s1", lease_seconds=5)
    assert await sweeper.sweep_once(now=now_ms() + 60_000) == [stream_id]

    taken, finished = step_entries(caplog)
    assert (taken["step"], taken["level"], taken["stream_id"]) == (
        "taken_over",
        "warning",
        stream_id,
    )
    assert (taken["tenant"], taken["attempt"], taken["by"]) == ("tenant-b", 2, "sweeper:s1")
    assert taken["duration_ms"] >= 60_000
    assert finished["step"] == "finished"
    assert (finished["status"], finished["error"]) == ("failed", "worker_lost")
