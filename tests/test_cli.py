"""The ``streambroker`` command as users run it: ``dev`` on each embedded store, and the
one-line errors (no traceback) for bad configuration."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.generations import create_stream
from tests.support.processes import BrokerProcess, run_cli, wait_ready
from tests.support.redis_server import free_port
from workers.providers.fake import fake_tokens

MESSAGES = [{"role": "user", "content": "Hello"}]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """As a user runs it, with only the system's binaries on ``PATH``."""
    return run_cli(*args, env={"PATH": "/usr/bin:/bin", **(env or {})}, text=True)


def generate_through(url: str, max_tokens: int) -> tuple[str, str]:
    """Create a fake generation, read its events to the end; return (streamed, state) text."""
    with httpx.Client(base_url=url, timeout=30) as client:
        stream_id = create_stream(client, max_tokens=max_tokens, rate=500, messages=MESSAGES)["id"]
        text = []
        with client.stream("GET", f"/v1/streams/{stream_id}/events") as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and '"text"' in line:
                    text.append(httpx.Response(200, content=line[6:]).json()["text"])
        return "".join(text), client.get(f"/v1/streams/{stream_id}").json()["text"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("store", "announces"),
    [
        ("fakeredis", "in-process fakeredis"),
        pytest.param("redis-server", "private redis-server", marks=pytest.mark.redis),
    ],
)
def test_dev_runs_the_whole_broker_with_an_embedded_store(store: str, announces: str) -> None:
    port = free_port()
    dev = BrokerProcess("dev", "--port", str(port), "--store", store, env={}, name="dev")
    try:
        dev.start()
        dev.wait_for_output(f"serving http://127.0.0.1:{port}")
        dev.wait_for_output(f"console at http://127.0.0.1:{port}/console")
        assert announces in dev.output()
        wait_ready(f"http://127.0.0.1:{port}")
        streamed, stored = generate_through(f"http://127.0.0.1:{port}", 25)
        assert streamed == stored == "".join(fake_tokens(MESSAGES, 25, 0))
        data_dir = re.search(r"data in (\S+),", dev.output())
    finally:
        # SIGTERM, as a process manager stops it: the embedded store must go with it.
        assert dev.stop() == 128 + signal.SIGTERM
    if store == "redis-server":
        assert data_dir is not None
        assert not Path(data_dir.group(1)).exists(), "the private redis-server was left behind"


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["worker"], {}, "REDIS_URL"),
        (["api"], {}, "REDIS_URL"),
        (["dev"], {"BROKER_BATCH_MAX_TOKENS": "lots"}, "BROKER_BATCH_MAX_TOKENS"),
        (["dev"], {"BROKER_HEARTBEAT_SECONDS": "0"}, "BROKER_HEARTBEAT_SECONDS"),
        (["dev"], {"BROKER_HEARTBEAT_SECOND": "5"}, "did you mean BROKER_HEARTBEAT_SECONDS"),
        (["dev"], {"BROKER_ROUTES": "fake=nope"}, "BROKER_ROUTES"),
        (["api", "--workers", "0"], {"REDIS_URL": "redis://127.0.0.1:1"}, "--workers"),
        (
            ["worker"],
            {"REDIS_URL": "redis://127.0.0.1:1", "BROKER_RETENTION_SECONDS": "60"},
            "BROKER_QUEUE_TIMEOUT_SECONDS=86400 must be less than BROKER_RETENTION_SECONDS=60",
        ),
        (["worker"], {"REDIS_URL": "redis://127.0.0.1:1/notanumber"}, "not a number"),
        (["api"], {"REDIS_URL": "redis://127.0.0.1:1/0?decode_responses=1"}, "decode_responses"),
        (["worker"], {"REDIS_URL": "redis+cluster://127.0.0.1:1/0"}, "path"),
    ],
)
def test_bad_configuration_stops_start_up_with_one_clear_line(
    args: list[str], env: dict[str, str], names: str
) -> None:
    result = cli(*args, env=env)
    assert result.returncode == 2
    assert names in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr + result.stdout


def test_help_lists_the_commands_and_every_setting() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for word in ("dev", "api", "worker", "BROKER_HEARTBEAT_SECONDS", "BROKER_ROUTES", "REDIS_URL"):
        assert word in result.stdout


def test_a_worker_that_cannot_reach_redis_says_so_in_one_line() -> None:
    closed = f"redis://127.0.0.1:{free_port()}"
    result = cli("worker", env={"REDIS_URL": closed})
    assert result.returncode == 1
    assert "cannot reach Redis" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
