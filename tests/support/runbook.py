"""docs/operations.md, the runbook, read as GitHub shows it: the anchors of its headings and
the ``streambroker …`` commands of its shell blocks."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

from tests.support.deploy_files import OPERATIONS


def markdown_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    anchors = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        title = re.sub(r"[^\w\- ]", "", title)
        anchors.add(title.replace(" ", "-"))
    return anchors


def docs_commands() -> Iterator[tuple[str, list[str]]]:
    """``streambroker …`` commands in the shell blocks of docs/operations.md."""
    in_code = False
    for number, line in enumerate(OPERATIONS.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            continue
        text = line.removeprefix("$ ").split(" #")[0].rstrip(" \\")
        try:
            tokens = shlex.split(text)
        except ValueError:
            continue
        while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
            tokens.pop(0)
        if tokens and Path(tokens[0]).name == "streambroker" and len(tokens) > 1:
            argv = []
            for token in tokens[1:]:
                if token in {"|", "&&", ";", ">", "&"}:
                    break
                argv.append(token)
            yield f"docs/operations.md:{number}", argv
