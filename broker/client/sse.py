"""An incremental Server-Sent Events decoder (the WHATWG parsing rules, minus what the
broker never sends).

Hand-written rather than taken from ``httpx-sse`` because the watcher needs what that
library hides: every line, comments (``: ping``) included, resets the heartbeat deadline,
and the byte count feeds the connection statistics.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from broker.numbers import int_or_none

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Frame:
    """One dispatched SSE event: its ``id`` (``None`` when the frame had no id line), its
    ``event`` type (``message`` by default) and its ``data`` lines joined by newlines."""

    id: str | None
    event: str
    data: str


class SSEDecoder:
    """Feed bytes as they arrive; get back the frames they complete and the ``retry:``
    value when one came. Partial lines and frames are kept until their end arrives."""

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[Frame]:
        text = self._pending + self._text.decode(chunk)
        # A CR at the very end may be the first half of a CRLF split across chunks: hold it
        # back, or the LF that follows would end an extra, empty line (an early dispatch).
        held = "\r" if text.endswith("\r") else ""
        *lines, rest = _LINE_END.split(text[: len(text) - len(held)])
        self._pending = rest + held
        frames = []
        for line in lines:
            frame = self._line(line)
            if frame is not None:
                frames.append(frame)
        return frames

    def _line(self, line: str) -> Frame | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the heartbeat
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and (retry := int_or_none(value, max_digits=9)) is not None:
            self.retry_ms = retry
        return None

    def _dispatch(self) -> Frame | None:
        event, data, frame_id = self._event or "message", self._data, self._id
        self._event, self._data, self._id = "", [], None
        if not data:
            return None
        return Frame(id=frame_id, event=event, data="\n".join(data))
