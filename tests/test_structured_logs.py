"""Structured logs: the formatters, the access log line per request, the generation lifecycle
lines, and real api and worker processes with ``BROKER_LOG_FORMAT=json`` whose every line is
one JSON object, with the tenant but never an API key or a read token."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from api.access_log import MAX_PATH, AccessLog
from broker.errors import ConfigError
from broker.events import Event, EventType
from broker.generation_log import GenerationLog
from broker.settings import Settings
from broker.state import Status, now_ms
from broker.structured_logs import JsonFormatter, TextFormatter, logging_config
from broker.sweeper import LeaseSweeper
from tests.support.generations import bearer, claimed, create_stream
from tests.support.processes import ApiProcess, BrokerProcess, Launcher, run_cli, wait_ready
from tests.support.redis_server import free_port
from tests.support.waiting import eventually

KEY = "key-of-tenant-a-for-the-log-test"
SECRET = "secret-that-signs-read-tokens-in-the-log-test"
AUTH = {"BROKER_API_KEYS": f"{KEY}:tenant-a", "BROKER_READ_TOKEN_SECRETS": SECRET}
JSON = {"BROKER_LOG_FORMAT": "json"}
BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def emit(formatter: logging.Formatter, emit_call: Callable[[logging.Logger], None]) -> str:
    """What one log call writes through a handler with ``formatter``."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    # Outside the logger hierarchy: only this handler sees the record (pytest's capture too
    # would format it, with a formatter of its own).
    logger = logging.Logger("tests.structured_logs", logging.DEBUG)
    logger.addHandler(handler)
    emit_call(logger)
    return out.getvalue()


def one_json_line(written: str) -> dict[str, Any]:
    assert written.endswith("\n")
    assert written.count("\n") == 1, written
    entry: dict[str, Any] = json.loads(written)
    return entry


# --- the formatters -------------------------------------------------------------------------


def test_a_json_line_has_the_time_level_logger_message_and_the_extra_fields() -> None:
    written = emit(
        JsonFormatter(),
        lambda log: log.info(
            "served %s", "x", extra={"stream_id": "abc", "status": 201, "duration_ms": 1.5}
        ),
    )
    entry = one_json_line(written)
    assert TIMESTAMP.match(entry["ts"]), entry["ts"]
    assert entry == {
        "ts": entry["ts"],
        "level": "info",
        "logger": "tests.structured_logs",
        "msg": "served x",
        "stream_id": "abc",
        "status": 201,
        "duration_ms": 1.5,
    }


def test_an_exception_is_one_string_field_on_the_same_line() -> None:
    def fail(log: logging.Logger) -> None:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("it failed", extra={"stream_id": "abc"})

    entry = one_json_line(emit(JsonFormatter(), fail))
    assert entry["level"] == "error"
    assert entry["msg"] == "it failed"
    assert entry["stream_id"] == "abc"
    assert entry["exc"].startswith("Traceback (most recent call last):")
    assert "ValueError: boom\nsecond line" in entry["exc"]


def test_newlines_and_non_ascii_in_the_message_stay_on_one_line() -> None:
    message = "line one\nline two\r\n\tü \u2028 \ud800"
    entry = one_json_line(emit(JsonFormatter(), lambda log: log.warning(message)))
    assert entry["msg"] == message


def test_values_json_cannot_hold_are_written_as_text() -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque!"

    cyclic: list[Any] = []
    cyclic.append(cyclic)
    extra = {
        "obj": Opaque(),
        "raw": b"\xffbytes",
        "tags": {"a"},
        "nan": float("nan"),
        "cyclic": cyclic,
        "status": Status.RUNNING,
    }
    entry = one_json_line(emit(JsonFormatter(), lambda log: log.info("odd", extra=extra)))
    assert entry["obj"] == "opaque!"
    assert entry["raw"] == "\ufffdbytes"
    assert entry["tags"] == ["a"]
    assert entry["nan"] == "nan"
    assert isinstance(entry["cyclic"], str)
    assert entry["status"] == "running"
    assert entry["msg"] == "odd"


def test_a_broken_log_call_still_writes_its_line() -> None:
    entry = one_json_line(emit(JsonFormatter(), lambda log: log.info("%d items", "many")))
    assert "%d items" in entry["msg"]
    assert "many" in entry["msg"]


def test_an_extra_field_cannot_replace_the_lines_own_keys() -> None:
    entry = one_json_line(
        emit(JsonFormatter(), lambda log: log.info("m", extra={"level": "x", "ts": "y"}))
    )
    assert entry["level"] == "info"
    assert TIMESTAMP.match(entry["ts"])


def test_the_text_line_appends_the_fields_as_key_value_then_the_traceback() -> None:
    def log_it(log: logging.Logger) -> None:
        try:
            raise KeyError("k")
        except KeyError:
            extra = {"stream_id": "abc", "reason": "two words", "n": 3, "ok": True}
            log.error("went %s", "wrong", exc_info=True, extra=extra)

    written = emit(TextFormatter(), log_it)
    first, *rest = written.splitlines()
    timestamp, level, name, *message = first.split(" ")
    assert TIMESTAMP.match(timestamp)
    assert (level, name) == ("ERROR", "tests.structured_logs:")
    assert " ".join(message) == 'went wrong stream_id=abc reason="two words" n=3 ok=true'
    assert rest[0].startswith("Traceback")
    assert rest[-1] == "KeyError: 'k'"


def test_unknown_formats_and_levels_are_refused() -> None:
    with pytest.raises(ValueError, match="xml"):
        logging_config("xml", "info")
    with pytest.raises(ValueError, match="loud"):
        logging_config("json", "loud")


def test_configured_logging_sends_every_library_through_the_json_handler() -> None:
    script = """
import logging, warnings
from broker.structured_logs import configure_logging
configure_logging("json", "info")
logging.getLogger("uvicorn.error").info("Started server", extra={"color_message": "\\x1b[1m"})
logging.getLogger("uvicorn.access").info("an access line uvicorn would write")
logging.getLogger("arq.worker").info("Starting worker for 1 functions: generate")
logging.getLogger("streambroker.x").debug("hidden at info")
warnings.warn("careful")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout == ""
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["logger"] for e in entries] == ["uvicorn.error", "arq.worker", "py.warnings"]
    assert entries[0]["msg"] == "Started server"
    assert "color_message" not in entries[0]
    assert entries[1]["msg"] == "Starting worker for 1 functions: generate"
    assert "UserWarning: careful" in entries[2]["msg"]


# --- settings ---------------------------------------------------------------------------------


def test_the_log_settings_default_to_text_at_info_and_ignore_case() -> None:
    assert (Settings().log.log_format, Settings().log.log_level) == ("text", "info")
    settings = Settings.from_env({"BROKER_LOG_FORMAT": "JSON", "BROKER_LOG_LEVEL": " Debug "})
    assert (settings.log.log_format, settings.log.log_level) == ("json", "debug")


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("BROKER_LOG_FORMAT", "xml"),
        ("BROKER_LOG_FORMAT", ""),
        ("BROKER_LOG_LEVEL", "verbose"),
        ("BROKER_LOG_LEVEL", "10"),
    ],
)
def test_a_bad_log_setting_is_refused_naming_it(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: raw})


def test_a_bad_log_format_stops_start_up_with_one_line() -> None:
    result = run_cli("worker", env={"PATH": "/usr/bin:/bin", "BROKER_LOG_FORMAT": "yaml"})
    stderr = result.stderr.decode()
    assert result.returncode == 2
    assert "BROKER_LOG_FORMAT" in stderr
    assert "expected one of json, text" in stderr
    assert "Traceback" not in stderr + result.stdout.decode()


# --- the access log middleware, in process ------------------------------------------------


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


# --- real processes -------------------------------------------------------------------------


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


@pytest.mark.e2e
@pytest.mark.redis
def test_json_logs_of_real_processes_tell_each_request_and_generation_step(
    processes_json: tuple[ApiProcess, BrokerProcess],
) -> None:
    api, worker = processes_json
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

    create = request_of(api, "POST", "/v1/streams")
    assert (create["status"], create["stream_id"]) == (201, stream_id)
    assert (create["tenant"], create["auth"]) == ("tenant-a", "key")
    assert create["duration_ms"] > 0
    assert create["level"] == "info"
    watch = request_of(api, "GET", events_url)
    assert (watch["status"], watch["stream_id"], watch["tenant"]) == (200, stream_id, "tenant-a")
    assert watch["auth"] == "token"
    assert watch["query"] == ["token"]
    assert watch["events"] == len(seen)
    assert watch["terminal"] is True
    assert watch["duration_ms"] > 0
    assert watch["bytes_sent"] > 0

    created_step = step_of(api, "created", stream_id)
    started = step_of(worker, "started", stream_id)
    first = step_of(worker, "first_token", stream_id)
    finished = step_of(worker, "finished", stream_id)
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
    assert finished["events"] == len(seen)

    failure = step_of(worker, "finished", failed_id)
    assert (failure["status"], failure["error"], failure["level"]) == (
        "failed",
        "fake_failure",
        "warning",
    )
    assert failure["tokens"] == 2

    assert any("Starting worker" in e["msg"] for e in json_entries(worker))
    api_output, worker_output = api.output(), worker.output()
    json_entries(api), json_entries(worker)  # every line, once more, now that all is written
    for secret in (KEY, token, SECRET, "Bearer"):
        assert secret not in api_output
        assert secret not in worker_output


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
