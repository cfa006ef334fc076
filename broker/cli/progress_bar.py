"""A progress bar kept on the line under text that is still being written.

``tail`` prints the answer on stdout as it arrives and, on a terminal, a status line under
it (``[#####-----]  45%  120 tokens  35.2 tok/s  ETA 3.1s``). Each write clears the bar,
writes the text, draws the bar on the next line and moves the cursor back to the end of the
text, so the answer flows as if the bar were not there. Moves are relative (up one line, to
a column), so they survive the terminal scrolling.
"""

from __future__ import annotations

import shutil
import unicodedata
from typing import TextIO

from broker.client import Progress

CLEAR_BELOW = "\x1b[J"
BAR_WIDTH = 24


class ProgressLine:
    def __init__(self, out: TextIO, status: TextIO, *, enabled: bool) -> None:
        self.out = out
        self.status = status
        self.enabled = enabled
        self.line = ""
        self._column = 0  # where the text's cursor is, for coming back after the bar

    def write(self, text: str) -> None:
        if self.enabled and self.line:
            self.status.write(CLEAR_BELOW)
            self.status.flush()
        self.out.write(text)
        self.out.flush()
        self._advance(text)
        self._draw()

    def update(self, progress: Progress, reconnects: int = 0) -> None:
        self.line = describe(progress, reconnects)
        if self.enabled:
            self.status.write(CLEAR_BELOW)
            self._draw()

    def close(self) -> None:
        if self.enabled and self.line:
            self.status.write(CLEAR_BELOW)
            self.status.flush()
        self.line = ""

    def _draw(self) -> None:
        if not (self.enabled and self.line):
            return
        width = shutil.get_terminal_size().columns
        # Down a line, the bar (never as wide as the terminal: a wrap would break the moves),
        # then back up to the column the text stopped at.
        self.status.write(f"\n\r{self.line[: width - 1]}\x1b[1A\x1b[{self._column + 1}G")
        self.status.flush()

    def _advance(self, text: str) -> None:
        width = max(1, shutil.get_terminal_size().columns)
        tail = text.rsplit("\n", 1)
        column = 0 if len(tail) == 2 else self._column
        column += sum(_cells(char) for char in tail[-1])
        self._column = column % width


def describe(progress: Progress, reconnects: int = 0) -> str:
    parts = []
    if progress.percent is not None:
        filled = round(BAR_WIDTH * min(progress.percent, 100) / 100)
        parts.append(f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {progress.percent:5.1f}%")
    parts.append(f"{progress.tokens} tokens")
    if progress.tokens_per_second is not None:
        parts.append(f"{progress.tokens_per_second:.1f} tok/s")
    if progress.eta_ms is not None:
        parts.append(f"ETA {progress.eta_ms / 1000:.1f}s")
    if reconnects:
        parts.append(f"{reconnects} reconnects")
    return "  ".join(parts)


def _cells(char: str) -> int:
    """Terminal cells a character takes: two for East Asian wide ones, none for combining."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
