"""The pieces of an import that need no Redis: the event codec's reserved keys, how a body
that comes in chunks is cut into lines, and the line-by-line checks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import msgpack
import pytest

from broker.archive import split_lines
from broker.archive_format import ArchiveError, Checker, read_header
from broker.events import Event, EventType
from tests.support import archives

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("reserved", ["type", "t"])
def test_event_data_cannot_override_the_events_own_fields(reserved: str) -> None:
    """Regression: ``encode`` put ``data`` over ``type`` and ``t``, so a payload holding
    them stored another event than the one appended."""
    event = Event(EventType.TOKEN, {"text": "x", "tokens": 1, reserved: "done"}, t=5)
    with pytest.raises(ValueError, match=reserved):
        event.encode()
    plain = Event(EventType.TOKEN, {"text": "x", "tokens": 1}, t=5)
    assert msgpack.unpackb(plain.encode()) == {"type": "token", "t": 5, "text": "x", "tokens": 1}
    assert Event.decode(plain.encode(), 3) == plain.with_seq(3)


async def chunks_of(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1 << 16])
async def test_lines_are_cut_at_newlines_only_wherever_the_chunks_end(size: int) -> None:
    # "é" and "€" are several bytes: small chunks end inside them.
    body = "é\u2028a\r\n\n€\x85b\u2029\nlast".encode()
    lines = [line async for line in split_lines(chunks_of(body, size))]
    assert lines == ["é\u2028a", "", "€\x85b\u2029", "last"]


async def test_a_line_that_is_not_utf8_is_named() -> None:
    body = b'{"a": 1}\n\n{"b": "\xff"}\n'
    with pytest.raises(ArchiveError, match="line 3: not UTF-8"):
        _ = [line async for line in split_lines(chunks_of(body, 4))]


def check(rows: archives.Rows) -> None:
    lines = archives.dumps(rows).removesuffix("\n").split("\n")
    checker = Checker(read_header(lines[0], 1))
    for number, line in enumerate(lines[1:], start=2):
        checker.add(line, number)
    checker.finish()


@pytest.mark.parametrize("end", ["stop", "length", "cancelled", "error"])
def test_what_a_worker_writes_passes_the_checks(end: str) -> None:
    check(archives.build(["a", "", "b\u2028c"], end=end, tool_call=True))
    check(archives.build([], end=end, progress=False))


def test_the_checks_name_the_line_and_the_field() -> None:
    rows = archives.build(["Hello", " world"])
    with pytest.raises(ArchiveError, match=r"^line 3: data\.type: reserved"):
        check(archives.changed(rows, 2, "data.type", "done"))
    with pytest.raises(ArchiveError, match=r"^line 1: meta\.usage: expected JSON of an object"):
        check(archives.changed(rows, 0, "meta.usage", json.dumps(5)))
    with pytest.raises(ArchiveError, match=r"^line 1: text: differs .* from line 5 on"):
        check(archives.changed(rows, 0, "text", "Hello there"))
    with pytest.raises(ArchiveError, match=r"^line 1: meta\.status: completed, but .* failed"):
        check(archives.changed(archives.build(end="error"), 0, "meta.status", "completed"))


def test_the_header_refuses_what_redis_could_not_store() -> None:
    """The header is parsed with plain ``json.loads`` (it can be most of the file), so its
    own checks must refuse what ``strict_json`` would: lone surrogates, a non-integer
    version."""
    rows = archives.build(["a"])
    for path, value, named in [
        ("text", "a\ud800", "line 1: text"),
        ("meta.worker", "host-\udc00", "line 1: meta"),
        ("version", 1.0, "line 1: not a streambroker.stream file"),
        ("version", True, "line 1: not a streambroker.stream file"),
    ]:
        header = json.dumps(archives.changed(rows, 0, path, value)[0])  # \ud800 escaped
        with pytest.raises(ArchiveError, match=named):
            read_header(header, 1)
    with pytest.raises(ArchiveError, match="line 1: not JSON"):
        read_header("[" * 100_000, 1)
