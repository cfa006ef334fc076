"""The operators' commands when things go wrong: whatever the failure (nothing listening, a
name that does not resolve, a broker that never answers, an error answer, an answer that is
not JSON, an export cut short, a closed stdout, Ctrl-C) each command prints one line on
stderr and exits non-zero, in bounded time, never a traceback.

Each command runs as users run it, a subprocess; the commands of one case run side by side.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.redis_server import free_port
from tests.support.scripted_broker import ScriptedBroker, answer, chunked, error_body

STREAM_ID = "01m7z9j8wh4r9fx1nwy0tg1dcq"
#: How long the commands here wait for a broker (``STREAMBROKER_TIMEOUT``; 10 s by default):
#: short, so that the tests of giving up do not wait ten seconds each.
TIMEOUT = 2
#: A broker that never answered must be given up on after ``TIMEOUT``; the interpreter's
#: start-up and a loaded machine get the rest.
BOUND = TIMEOUT + 5.0
HTML = b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body>nginx</body>\n</html>\n"


@dataclass(frozen=True)
class Ran:
    command: str
    returncode: int
    stdout: bytes
    stderr: str
    seconds: float


@pytest.fixture
def archive(tmp_path: Path) -> str:
    path = tmp_path / "stream.jsonl"
    path.write_text(json.dumps({"format": "streambroker.stream", "version": 1}) + "\n")
    return str(path)


def every_command(archive: str) -> list[list[str]]:
    return [
        ["ls"],
        ["tail", STREAM_ID],
        ["replay", STREAM_ID],
        ["export", STREAM_ID],
        ["import", archive],
    ]


def popen(*args: str, url: str) -> subprocess.Popen[bytes]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": "/tmp",
        "STREAMBROKER_URL": url,
        "STREAMBROKER_TIMEOUT": str(TIMEOUT),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "broker", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def run_side_by_side(commands: list[list[str]], url: str, bound: float = BOUND) -> list[Ran]:
    """Starts every command at once and waits for each until ``bound`` seconds after the
    start; a command still running then is killed and fails the test."""
    start = time.monotonic()
    ran = []
    with contextlib.ExitStack() as stack:
        processes = [(" ".join(c), stack.enter_context(popen(*c, url=url))) for c in commands]
        stack.callback(kill_all, [process for _, process in processes])  # before the closes
        for name, process in processes:
            try:
                out, err = process.communicate(timeout=max(0.1, start + bound - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"`streambroker {name}` still running after {bound:g}s")
            ran.append(Ran(name, process.returncode, out, err.decode(), time.monotonic() - start))
    return ran


def kill_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()


def assert_one_line_error(ran: Ran, *, returncode: int = 1) -> str:
    assert "Traceback" not in ran.stderr, (ran.command, ran.stderr)
    assert ran.returncode == returncode, (ran.command, ran.returncode, ran.stderr)
    assert ran.stderr.count("\n") == 1, (ran.command, ran.stderr)
    assert ran.stderr.startswith("streambroker: "), (ran.command, ran.stderr)
    return ran.stderr


def test_every_command_fails_in_one_line_when_nothing_listens(archive: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for ran in run_side_by_side(every_command(archive), url):
        assert "cannot reach the broker" in assert_one_line_error(ran), ran


def test_every_command_fails_in_one_line_when_the_host_does_not_resolve(archive: str) -> None:
    for ran in run_side_by_side(every_command(archive), "http://streambroker.invalid:8000"):
        assert "cannot reach the broker" in assert_one_line_error(ran), ran


@pytest.mark.parametrize("given", ["0", "0.05", "3601", "ten", "nan", "inf"])
def test_a_bad_timeout_is_a_one_line_error(given: str) -> None:
    with popen("ls", "--timeout", given, url=f"http://127.0.0.1:{free_port()}") as process:
        out, err = process.communicate(timeout=BOUND)
    ran = Ran("ls", process.returncode, out, err.decode(), 0)
    assert "--timeout" in assert_one_line_error(ran, returncode=2)


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A port that accepts connections (the kernel completes them in the listen backlog)
    and never reads or answers a request."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_commands_fail_in_bounded_time_when_the_broker_never_answers(silent_url: str) -> None:
    # `import` waits longer for its answer (a large archive takes the broker a while).
    commands = [["ls"], ["tail", STREAM_ID], ["replay", STREAM_ID], ["export", STREAM_ID]]
    for ran in run_side_by_side(commands, silent_url):
        assert "did not answer" in assert_one_line_error(ran), ran
        assert ran.seconds < BOUND


def test_every_command_reports_an_error_answer_in_one_line(archive: str) -> None:
    # 404 and 401 end a watch at once; a 500 is retried, until the broker has not let the
    # watch in for TIMEOUT seconds.
    for status, code in [(404, "stream_not_found"), (401, "unauthorized"), (500, "internal")]:
        with ScriptedBroker(answer(status, error_body(code, f"the {code} message"))) as broker:
            for ran in run_side_by_side(every_command(archive), broker.url):
                stderr = assert_one_line_error(ran)
                assert f"{code}: the {code} message (HTTP {status})" in stderr, ran
                assert ran.seconds < BOUND


@pytest.mark.parametrize("status", [200, 502])
def test_an_answer_that_is_not_json_is_a_one_line_error(archive: str, status: int) -> None:
    with ScriptedBroker(answer(status, HTML, "text/html")) as broker:
        for ran in run_side_by_side(every_command(archive), broker.url):
            assert "html" in assert_one_line_error(ran), ran
            assert ran.seconds < BOUND


HEADER = {"format": "streambroker.stream", "version": 1, "id": STREAM_ID, "text": ""}


def archive_lines(last_seq: int, events: int) -> list[bytes]:
    header = {**HEADER, "meta": {"last_seq": str(last_seq)}}
    lines = [json.dumps(header).encode() + b"\n"]
    for seq in range(1, events + 1):
        event = {"id": seq, "event": "token", "t": seq, "data": {"text": "x", "tokens": 1}}
        lines.append(json.dumps(event).encode() + b"\n")
    return lines


@pytest.mark.parametrize(
    "response",
    [
        # The connection is cut before the chunked body's end.
        chunked(200, archive_lines(5, 2), "application/x-ndjson", complete=False),
        # A body that ends cleanly but short of the header's last event (a proxy that
        # ends its answer when its upstream is cut).
        chunked(200, archive_lines(5, 2), "application/x-ndjson", complete=True),
    ],
    ids=["cut", "short"],
)
def test_an_export_that_ends_short_is_an_error_not_a_short_file(response: bytes) -> None:
    with ScriptedBroker(response) as broker:
        [ran] = run_side_by_side([["export", STREAM_ID]], broker.url)
    assert STREAM_ID in assert_one_line_error(ran)
    assert ran.stdout.startswith(archive_lines(5, 0)[0])  # what came is written out


def test_a_complete_export_is_written_out_and_exits_0() -> None:
    lines = archive_lines(3, 3)
    with ScriptedBroker(chunked(200, lines, "application/x-ndjson", complete=True)) as broker:
        [ran] = run_side_by_side([["export", STREAM_ID]], broker.url)
    assert (ran.returncode, ran.stderr) == (0, "")
    assert ran.stdout == b"".join(lines)


def test_a_closed_stdout_is_one_line_and_a_non_zero_exit() -> None:
    # `streambroker export ID | head -1`: far more than a pipe's buffer, so the command is
    # still writing when the reader leaves.
    lines = archive_lines(20_000, 20_000)
    with ScriptedBroker(answer(200, b"".join(lines), "application/x-ndjson")) as broker:
        process = popen("export", STREAM_ID, url=broker.url)
        try:
            assert process.stdout is not None
            assert process.stdout.readline() == lines[0]
            process.stdout.close()
            _, err = process.communicate(timeout=BOUND)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    ran = Ran("export", process.returncode, b"", err.decode(), 0)
    assert "stdout" in assert_one_line_error(ran)


def test_ctrl_c_is_one_line_and_exit_130() -> None:
    stream_head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    with ScriptedBroker(stream_head, hold=True) as broker:
        process = popen("tail", STREAM_ID, url=broker.url)
        try:
            assert broker.requested.wait(BOUND), "tail never connected"
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=BOUND)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=10)
    ran = Ran("tail", process.returncode, out, err.decode(), 0)
    assert "interrupted" in assert_one_line_error(ran, returncode=130)
