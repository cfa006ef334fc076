"""``streambroker api`` behind a load balancer: draining on SIGTERM (``--drain-seconds``),
the forwarded client address (``--forwarded-allow-ips``, ``--no-proxy-headers``), the
keep-alive timeout, and one-line refusals of bad values; real processes."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
from typing import Any

import anyio
import httpx
import pytest

from broker.state import new_stream_id
from tests.support.generations import assert_well_formed, create, expected_text
from tests.support.processes import ApiProcess, ApiProcessWith, Launcher, run_cli
from tests.support.sse import Received, token_text, watch
from tests.support.waiting import eventually, eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


def api_with(launch: Launcher, *options: str, env: dict[str, str] | None = None) -> ApiProcess:
    """An api process given ``options``, ready, stopped with the rest of the test's."""
    api = ApiProcessWith(launch.redis_url, *options, env=env)
    launch.adopt(api)
    return api.start()


class Reader:
    """An SSE reader of one stream, in the background: the events so far, and its end."""

    def __init__(self, client: httpx.AsyncClient, base: str, stream_id: str) -> None:
        self.events: list[Received] = []
        self._task = asyncio.ensure_future(self._read(client, base, stream_id))

    async def _read(self, client: httpx.AsyncClient, base: str, stream_id: str) -> int:
        url = f"{base}/v1/streams/{stream_id}/events"
        async with client.stream("GET", url) as response:
            assert response.status_code == 200
            data: dict[str, Any] = {}
            kind = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                elif line.startswith("id: "):
                    self.events.append(Received(int(line[4:]), kind, data))
        return len(self.events)

    async def ended(self, within: float = 30) -> list[Received]:
        with anyio.fail_after(within):
            await self._task
        return self.events


async def draining(client: httpx.AsyncClient, base: str) -> bool:
    response = await client.get(f"{base}/readyz")
    return response.status_code == 503 and response.json() == {"status": "draining"}


async def test_a_draining_api_leaves_rotation_keeps_serving_then_hands_readers_over(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    env = {"BROKER_HEARTBEAT_SECONDS": "0.3"}
    leaving = api_with(launch, "--drain-seconds", "4", env=env)
    staying = launch.api(env)
    launch.worker()
    stream_id = await create(client, leaving.url, max_tokens=400, rate=40, seed=3)
    reader = Reader(client, leaving.url, stream_id)
    await eventually_async(lambda: len(reader.events) >= 3)
    assert leaving.process is not None

    leaving.process.send_signal(signal.SIGTERM)
    await eventually_async(lambda: draining(client, leaving.url))
    seen_when_draining = len(reader.events)
    # Out of rotation, but serving: the reader gets more events, other requests answer.
    await eventually_async(lambda: len(reader.events) > seen_when_draining + 3)
    assert (await client.get(f"{leaving.url}/healthz")).status_code == 200
    assert (await client.get(f"{leaving.url}/v1/streams/{stream_id}")).status_code == 200
    assert await draining(client, leaving.url)

    # Then the reader's stream ends (not the generation: 400 tokens at 40/s) and the
    # process stops.
    before = await reader.ended()
    assert before[-1].type not in ("done", "error")
    process = leaving.process
    await anyio.to_thread.run_sync(lambda: process.wait(20))

    # The reader resumes on another api from its last id: exactly the rest.
    with anyio.fail_after(40):
        after = await watch(client, staying.url, stream_id, after=before[-1].id)
        whole = await watch(client, staying.url, stream_id)
    assert after.ended
    assert_well_formed(whole.events)
    assert before + after.events == whole.events
    assert token_text(before + after.events) == expected_text(400, seed=3)


async def test_a_second_signal_cuts_the_drain_short(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    leaving = api_with(launch, "--drain-seconds", "600")
    launch.worker()
    stream_id = await create(client, leaving.url, max_tokens=400, rate=40)
    reader = Reader(client, leaving.url, stream_id)
    await eventually_async(lambda: len(reader.events) >= 2)
    process = leaving.process
    assert process is not None

    process.send_signal(signal.SIGTERM)
    await eventually_async(lambda: draining(client, leaving.url))
    process.send_signal(signal.SIGTERM)
    events = await reader.ended(within=20)  # not 600 s
    assert events[-1].type not in ("done", "error")
    await anyio.to_thread.run_sync(lambda: process.wait(20))


async def test_without_drain_seconds_the_api_stops_at_once(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    """The default (0): SIGTERM ends the streams and stops the process, no wait."""
    api = launch.api()
    launch.worker()
    stream_id = await create(client, api.url, max_tokens=400, rate=40)
    reader = Reader(client, api.url, stream_id)
    await eventually_async(lambda: len(reader.events) >= 2)
    process = api.process
    assert process is not None
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    await reader.ended(within=20)
    await anyio.to_thread.run_sync(lambda: process.wait(20))
    assert time.monotonic() - started < 8  # the generation itself would take 10 s


def access_lines(api: ApiProcess, path: str) -> list[dict[str, Any]]:
    lines = []
    for line in api.output().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("logger") == "streambroker.access" and entry.get("path") == path:
                lines.append(entry)
    return lines


def client_logged(api: ApiProcess, headers: dict[str, str]) -> str:
    """The ``client`` of the access line of one request (a 404) sent with ``headers``."""
    path = f"/v1/streams/{new_stream_id()}"
    assert httpx.get(f"{api.url}{path}", headers=headers, timeout=10).status_code == 404
    (entry,) = eventually(lambda: access_lines(api, path), what=f"the access line of {path}")
    client: str = entry["client"]
    return client


@pytest.mark.parametrize(
    ("options", "forwarded", "logged"),
    [
        ([], "203.0.113.7", "203.0.113.7"),  # the default trusts 127.0.0.1, the test's peer
        ([], "198.51.100.1, 203.0.113.7", "203.0.113.7"),  # the last untrusted hop
        (["--forwarded-allow-ips", "*"], "198.51.100.1, 203.0.113.7", "198.51.100.1"),
        (["--forwarded-allow-ips", "127.0.0.0/8,10.0.0.1"], "203.0.113.7", "203.0.113.7"),
        (["--forwarded-allow-ips", "10.0.0.1"], "203.0.113.7", "127.0.0.1:"),  # not trusted
        (["--no-proxy-headers"], "203.0.113.7", "127.0.0.1:"),
    ],
)
def test_the_access_log_names_the_forwarded_client_of_a_trusted_proxy(
    launch: Launcher, options: list[str], forwarded: str, logged: str
) -> None:
    api = api_with(launch, *options, env={"BROKER_LOG_FORMAT": "json"})
    client = client_logged(api, {"X-Forwarded-For": forwarded})
    if logged.endswith(":"):
        assert client.startswith(logged)
        assert client[len(logged) :].isdigit()
    else:
        assert client == logged


def idle_connection(api: ApiProcess, timeout: float) -> socket.socket:
    """A connection to ``api`` that made one request, read its answer and is now idle;
    reads on it time out after ``timeout`` seconds."""
    conn = socket.create_connection(("127.0.0.1", api.port), timeout=10)
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    received = b""
    while b'{"status":"ok"}' not in received:
        chunk = conn.recv(4096)
        assert chunk, "closed before the answer"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    conn.settimeout(timeout)
    return conn


def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(launch: Launcher) -> None:
    api = api_with(launch, "--keep-alive-timeout", "1")
    with idle_connection(api, timeout=3.5) as conn:
        # Closed by the server after 1 s idle; uvicorn's own default (5 s) would time out.
        assert conn.recv(4096) == b""


def test_the_default_keep_alive_outlasts_uvicorns_own(launch: Launcher) -> None:
    """75 s by default: still open after uvicorn's default (5 s) has passed."""
    api = launch.api()
    with idle_connection(api, timeout=6) as conn, pytest.raises(TimeoutError):
        conn.recv(4096)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("options", "env", "named"),
    [
        (["--keep-alive-timeout", "0"], {}, "--keep-alive-timeout"),
        (["--keep-alive-timeout", "3601"], {}, "--keep-alive-timeout"),
        (["--keep-alive-timeout", "1.5"], {}, "--keep-alive-timeout"),
        (["--keep-alive-timeout", "soon"], {}, "--keep-alive-timeout"),
        (["--forwarded-allow-ips", "10.0.0.300"], {}, "--forwarded-allow-ips"),
        (["--forwarded-allow-ips", "proxy.local"], {}, "--forwarded-allow-ips"),
        (["--forwarded-allow-ips", "10.0.0.1,"], {}, "--forwarded-allow-ips"),
        (["--forwarded-allow-ips", "*,10.0.0.1"], {}, "--forwarded-allow-ips"),
        (["--no-proxy-headers", "--forwarded-allow-ips", "*"], {}, "--no-proxy-headers"),
        (["--drain-seconds", "-1"], {}, "--drain-seconds"),
        (["--drain-seconds", "3601"], {}, "--drain-seconds"),
        (["--drain-seconds", "ten"], {}, "--drain-seconds"),
        ([], {"BROKER_DRAIN_SECONDS": "ten"}, "BROKER_DRAIN_SECONDS"),
        ([], {"BROKER_DRAIN_SECONDS": "3601"}, "BROKER_DRAIN_SECONDS"),
    ],
)
def test_bad_load_balancer_options_give_one_line(
    options: list[str], env: dict[str, str], named: str
) -> None:
    result = run_cli(
        "api", *options, env={"REDIS_URL": "redis://127.0.0.1:1", **env}, text=True, timeout=30
    )
    assert named in one_line_error(result)


def test_the_help_names_the_options_and_their_defaults() -> None:
    result = run_cli("api", "--help", text=True, timeout=30)
    assert result.returncode == 0
    for text in (
        "--keep-alive-timeout",
        "default 75",
        "--forwarded-allow-ips",
        "default 127.0.0.1",
        "--no-proxy-headers",
        "--drain-seconds",
    ):
        assert text in " ".join(result.stdout.split()), text
    worker = run_cli("worker", "--help", text=True, timeout=30)
    assert "--port" in worker.stdout
