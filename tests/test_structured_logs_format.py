"""Structured logs, the formatting: a JSON line per record (the time, level, logger,
message and extra fields; exceptions, odd values and broken calls on the same line), the
text line with its ``key=value`` fields, the logging configuration every library goes
through, and the ``BROKER_LOG_FORMAT``/``BROKER_LOG_LEVEL`` settings."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from broker.errors import ConfigError
from broker.settings import Settings
from broker.state import Status
from broker.structured_logs import JsonFormatter, TextFormatter, logging_config
from tests.support.log_lines import TIMESTAMP
from tests.support.processes import run_cli


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


# --- settings -------------------------------------------------------------------------------


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
