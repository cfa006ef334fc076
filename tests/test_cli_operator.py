"""The operators' commands (``ls``, ``tail``, ``replay``, ``export``, ``import``) run as users
run them: a subprocess against real api and worker processes. Output is checked exactly;
errors must be one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from broker.client import Client
from tests.support.chaos_proxy import ChaosProxy
from tests.support.generations import MESSAGES, expected_text
from tests.support.processes import ApiProcess, Launcher, api_and_worker, run_cli
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

KEY = "operator-key-0123456789"
SECRET = "s" * 32
ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    env = {"BROKER_HEARTBEAT_SECONDS": "0.2", "BROKER_RETRY_MS": "20"}
    with api_and_worker(redis_server.url, env) as api:
        yield api


def cli(
    *args: str, url: str, stdin: bytes | None = None, **env: str
) -> subprocess.CompletedProcess[bytes]:
    return run_cli(*args, env={"STREAMBROKER_URL": url, **env}, stdin=stdin)


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith("streambroker: "), stderr
    return stderr


def generate(url: str, max_tokens: int, seed: int, rate: float = 400, **fake: object) -> str:
    with Client(url) as sb:
        stream = sb.create(
            "fake",
            MESSAGES,
            max_tokens=max_tokens,
            metadata={"suite": "cli", "seed": str(seed)},
            fake={"seed": seed, "tokens_per_second": rate, **fake},
        )
        return stream.id


def finished(url: str, max_tokens: int, seed: int, rate: float = 400) -> str:
    stream_id = generate(url, max_tokens, seed, rate)
    with Client(url) as sb:
        list(sb.watch(stream_id))
    return stream_id


def test_tail_prints_the_answer_live_and_exactly(api: ApiProcess) -> None:
    stream_id = generate(api.url, 40, seed=1, rate=100)  # still running when tail starts
    result = cli("tail", stream_id, url=api.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == expected_text(40, seed=1) + "\n"
    assert result.stderr == b""  # no bar when stderr is not a terminal


def test_tail_through_a_proxy_that_cuts_connections_still_prints_the_exact_text(
    api: ApiProcess,
) -> None:
    stream_id = generate(api.url, 80, seed=2, rate=200)

    async def through_proxy() -> tuple[subprocess.CompletedProcess[bytes], int]:
        async with ChaosProxy(api.port, cut_after=(1, 500), seed=2) as proxy:
            url = f"http://127.0.0.1:{proxy.port}"
            result = await asyncio.to_thread(cli, "tail", stream_id, url=url)
            return result, proxy.cuts

    result, cuts = asyncio.run(through_proxy())
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == expected_text(80, seed=2) + "\n"
    assert cuts >= 2


def test_tail_shows_a_progress_bar_on_a_terminal(api: ApiProcess) -> None:
    stream_id = generate(api.url, 60, seed=3, rate=60)  # one second: several progress events
    terminal, tty = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker", "tail", stream_id, "--url", api.url],
            stdout=subprocess.PIPE,
            stderr=tty,
            env={"PATH": os.environ["PATH"], "HOME": "/tmp", "COLUMNS": "120"},
        )
        os.close(tty)
        tty = -1
        stdout, _ = process.communicate(timeout=60)
        screen = b""
        while True:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the process closed its end
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(terminal)
        if tty >= 0:
            os.close(tty)
    assert process.returncode == 0
    assert stdout.decode() == expected_text(60, seed=3) + "\n"  # the bar never mixes in
    bar = ESCAPES.sub("", screen.decode())
    assert re.search(r"\[#+-*\]\s+\d+\.\d% +\d+ tokens +\d+\.\d tok/s +ETA \d+\.\ds", bar), bar
    assert "[#" + "#" * 23 + "] 100.0%  60 tokens" in bar
    assert "[stop · 60 tokens · 0 reconnects]" in bar


def test_tail_of_a_failed_stream_exits_1_with_its_error(api: ApiProcess) -> None:
    stream_id = generate(api.url, 40, seed=4, fail_after_tokens=5)
    result = cli("tail", stream_id, url=api.url)
    assert result.returncode == 1
    stderr = result.stderr.decode()
    assert "the stream failed: fake_failure:" in stderr
    assert "Traceback" not in stderr
    assert result.stdout.decode() == expected_text(40, seed=4)[: len(result.stdout)]


def test_replay_keeps_the_pacing_scaled_by_speed(api: ApiProcess) -> None:
    stream_id = finished(api.url, 40, seed=5, rate=40)  # recorded over about a second
    timings = {}
    for speed in ("1", "10"):
        start = time.monotonic()
        result = cli("replay", stream_id, "--speed", speed, url=api.url)
        timings[speed] = time.monotonic() - start
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode() == expected_text(40, seed=5) + "\n"
    # Both pay the interpreter's start-up; the replay itself is ~1 s against ~0.1 s.
    assert timings["1"] - timings["10"] > 0.6, timings


def test_replay_and_tail_from_a_resume_point(api: ApiProcess) -> None:
    stream_id = finished(api.url, 10, seed=6)
    result = cli("tail", stream_id, "--from", "3", "--events", url=api.url)
    events = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert next(event["id"] for event in events) == 4
    assert events[-1]["event"] == "done"
    with Client(api.url) as sb:
        last = sb.get(stream_id)["last_event_id"]
    ended = cli("tail", stream_id, "--from", str(last), url=api.url)
    assert ended.returncode == 0
    assert ended.stdout == b""
    assert b"already ended" in ended.stderr


def test_ls_lists_newest_first_with_filters_and_pages(api: ApiProcess) -> None:
    ids = [finished(api.url, 5, seed=seed) for seed in (70, 71, 72)]
    table = cli("ls", "--metadata", "suite=cli", "--limit", "200", url=api.url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.decode().splitlines()
    assert lines[0].split() == [
        "ID", "STATUS", "MODEL", "TENANT", "CREATED", "TTFT", "TOK/S", "TOKENS", "VIEWERS",
    ]  # fmt: skip
    listed = [line.split()[0] for line in lines[1:]]
    assert listed[:3] == ids[::-1]
    row = lines[1].split()
    assert row[1:4] == ["completed", "fake", "-"]
    assert row[-2] == "5"
    assert row[-1] == "1"
    one = cli("ls", "--metadata", "seed=71", "--json", url=api.url)
    assert [json.loads(line)["id"] for line in one.stdout.decode().splitlines()] == [ids[1]]
    first = cli("ls", "--metadata", "suite=cli", "--limit", "2", url=api.url)
    more = first.stderr.decode().strip()
    assert more.startswith("more: streambroker ls --cursor ")
    rest = cli("ls", "--metadata", "suite=cli", "--limit", "2", "--cursor", more.split()[-1],
               url=api.url)  # fmt: skip
    paged = [line.split()[0] for line in (first.stdout + rest.stdout).decode().splitlines()
             if not line.startswith("ID")]  # fmt: skip
    assert paged[:3] == ids[::-1]
    assert len(paged) == len(set(paged))
    everything = cli("ls", "--metadata", "suite=cli", "--limit", "1", "--all", "--json",
                     url=api.url)  # fmt: skip
    assert len(everything.stdout.splitlines()) == len(listed)
    assert everything.stderr == b""


def test_export_then_import_into_another_broker(api: ApiProcess, launch: Launcher) -> None:
    stream_id = finished(api.url, 20, seed=8)
    exported = cli("export", stream_id, url=api.url)
    assert exported.returncode == 0
    assert json.loads(exported.stdout.splitlines()[0])["id"] == stream_id
    other = launch.api(redis_url=launch.redis_url.rsplit("/", 1)[0] + "/5")
    imported = cli("import", "-", url=other.url, stdin=exported.stdout)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.decode().startswith(f"imported {stream_id}: /v1/streams/")
    again = cli("import", "-", url=other.url, stdin=exported.stdout)
    assert "stream_exists" in one_line_error(again)
    header, *events = cli("export", stream_id, url=other.url).stdout.splitlines()
    assert json.loads(header) == json.loads(exported.stdout.splitlines()[0])
    assert events == exported.stdout.splitlines()[1:]
    replayed = cli("tail", stream_id, url=other.url)
    assert replayed.stdout.decode() == expected_text(20, seed=8) + "\n"


def test_errors_are_one_line_and_a_non_zero_exit(api: ApiProcess, tmp_path: object) -> None:
    unknown = cli("tail", "01m7z9j8wh4r9fx1nwy0tg1dcq", url=api.url)
    assert "stream_not_found" in one_line_error(unknown)
    assert unknown.returncode == 1
    assert "cannot reach the broker" in one_line_error(cli("ls", url="http://127.0.0.1:9"))
    speed = cli("replay", finished(api.url, 3, seed=9), "--speed", "0", url=api.url)
    assert "replay" in one_line_error(speed)
    missing = cli("import", "/nonexistent/stream.jsonl", url=api.url)
    assert "cannot read /nonexistent/stream.jsonl" in one_line_error(missing)
    assert missing.returncode == 2
    garbage = cli("import", "-", url=api.url, stdin=b"not json\n")
    assert "invalid_archive" in one_line_error(garbage)
    assert "--limit" in one_line_error(cli("ls", "--limit", "0", url=api.url))
    assert "KEY=VALUE" in one_line_error(cli("ls", "--metadata", "novalue", url=api.url))


def test_tail_with_wait_keeps_trying_until_the_broker_starts(
    api: ApiProcess, launch: Launcher
) -> None:
    stream_id = finished(api.url, 8, seed=11)
    later = launch.adopt(ApiProcess(launch.redis_url))  # its port chosen, nothing listening yet
    env = {"PATH": os.environ["PATH"], "HOME": "/tmp", "STREAMBROKER_URL": later.url}
    process = subprocess.Popen(
        [sys.executable, "-m", "broker", "tail", stream_id, "--wait", "--timeout", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # Well past the deadline it would have without --wait (1 s), it is still trying.
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(timeout=4)
        later.start()
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert stdout.decode() == expected_text(8, seed=11) + "\n"


def test_with_auth_on_the_key_and_read_tokens_are_used(launch: Launcher) -> None:
    api = launch.api({"BROKER_API_KEYS": f"{KEY}:ops", "BROKER_READ_TOKEN_SECRETS": SECRET})
    launch.worker()
    assert "HTTP 401" in one_line_error(cli("ls", url=api.url))
    with Client(api.url, api_key=KEY) as sb:
        stream = sb.create("fake", MESSAGES, max_tokens=6, fake={"seed": 10})
    assert stream.read_token is not None
    listed = cli("ls", "--json", url=api.url, STREAMBROKER_API_KEY=KEY)
    assert json.loads(listed.stdout.splitlines()[0])["tenant"] == "ops"
    tail = cli("tail", stream.id, "--token", stream.read_token, url=api.url)
    assert tail.stdout.decode() == expected_text(6, seed=10) + "\n"
