"""Logging of every process: one line per record on stderr, as JSON or as text.

``BROKER_LOG_FORMAT=json`` writes one JSON object per line, for a log pipeline::

    {"ts":"2026-11-21T14:53:31.409Z","level":"info","logger":"streambroker.generation",
     "msg":"generation started","step":"started","stream_id":"01j…","queue_ms":14, …}

``ts`` (RFC 3339 UTC, milliseconds, like every API timestamp), ``level``, ``logger`` and
``msg`` come first; then the structured fields the call passed with ``extra=``; then ``exc``
(the traceback, one string) when there was an exception. A value JSON cannot hold is written
as text (its ``str()``, else its ``repr()``), so a log call never fails and never breaks a
line in two.
``BROKER_LOG_FORMAT=text`` (the default) writes the same records for people, fields appended
as ``key=value``.

The root logger carries the one handler, so third-party records (uvicorn's start-up and
errors, arq's job lines) come out in the same format; uvicorn's access log is switched off,
because ``api.access_log`` writes one line per request with more in it. Generation lifecycle
steps (``step()``) are logged by the api, the workers and the sweepers under
``streambroker.generation``, so one stream id finds a generation's whole story.
"""

from __future__ import annotations

import json
import logging
import logging.config
import math
from typing import Any

from broker.state import iso_ms

FORMATS = ("json", "text")
LEVELS = ("debug", "info", "warning", "error")

#: Attributes every ``LogRecord`` has; any other attribute came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    # uvicorn's copy of its message with terminal colours: noise in a log file.
    "color_message",
}
_RESERVED = ("ts", "level", "logger", "msg", "exc", "stack")

generation_logger = logging.getLogger("streambroker.generation")


def step(name: str, stream_id: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one step of a generation's life (``created``, ``started``, ``first_token``,
    ``finished``, …) with its stream id; fields that are None are left out."""
    if not generation_logger.isEnabledFor(level):
        return
    extra: dict[str, Any] = {"step": name, "stream_id": stream_id}
    extra.update((key, value) for key, value in fields.items() if value is not None)
    generation_logger.log(level, "generation %s", name.replace("_", " "), extra=extra)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record: what its call passed with ``extra=``."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _RECORD_ATTRIBUTES and not key.startswith("_")
    }


def _message(record: logging.LogRecord) -> str:
    """``record.getMessage()``, or what can be shown when its arguments do not fit it: a
    broken log call must not cost the line (logging would print a traceback instead)."""
    try:
        return record.getMessage()
    except Exception:
        return f"{record.msg!s} {record.args!r}"


def _timestamp(record: logging.LogRecord) -> str:
    ts = iso_ms(int(record.created * 1000))
    assert ts is not None
    return ts


def _plain(value: Any) -> Any:
    """A JSON-encodable stand-in for what ``json`` cannot encode."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, set | frozenset):
        return [_plain(item) for item in value]
    return str(value)


def _encodable(value: Any) -> Any:
    """``value`` if it encodes as strict JSON, else a string showing it (NaN, a cycle, an
    object whose ``str()`` fails)."""
    try:
        json.dumps(value, default=_plain, allow_nan=False)
        return value
    except Exception:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        try:
            return repr(value)
        except Exception:
            return f"<{type(value).__name__}>"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (``json`` escapes every newline)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record),
        }
        for key, value in record_fields(record).items():
            if key not in _RESERVED:  # the record's own keys win over a clashing extra
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return _dumps(entry)
        except Exception:
            return _dumps({key: _encodable(value) for key, value in entry.items()})


def _dumps(entry: dict[str, Any]) -> str:
    # ASCII only: a line never depends on the encoding of stderr, and lone surrogates
    # (from undecodable input) cannot make the write fail.
    return json.dumps(entry, default=_plain, allow_nan=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger>: <message> key=value …``, then the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {_message(record)}"
        fields = record_fields(record)
        if fields:
            line += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        simple = value != "" and value.isprintable() and not any(c in value for c in ' "=')
        return value if simple else json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    try:
        return json.dumps(value, default=_plain, ensure_ascii=False)
    except Exception:
        return repr(_encodable(value))


def logging_config(log_format: str = "text", level: str = "info") -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of a process. uvicorn takes it as ``log_config``
    and applies it again in each worker process it starts (``api --workers N``)."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(FORMATS)}")
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: expected one of {', '.join(LEVELS)}")
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    return {
        "version": 1,
        # Loggers created at import time (ours, arq's, redis') must keep logging.
        "disable_existing_loggers": False,
        "formatters": {"broker": {"()": formatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "broker",
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            # No handlers of their own (a config applied before may have left some): their
            # records go to the root's handler, in our format.
            "uvicorn": {"handlers": [], "propagate": True},
            "uvicorn.error": {"handlers": [], "propagate": True},
            # Replaced by api.access_log's line per request.
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }


def configure_logging(log_format: str = "text", level: str = "info") -> None:
    """Install the stderr handler of ``log_format`` at ``level`` for the whole process."""
    logging.config.dictConfig(logging_config(log_format, level))
    # warnings.warn output would otherwise be several raw lines on stderr.
    logging.captureWarnings(True)
