"""Light SSE clients for ``fanout.py``: one process holds a few hundred event connections.

The load generator has to cost less than the server it measures, so a client is a
non-blocking socket in one ``selectors`` loop (no asyncio, no HTTP library): it writes one
hand-made HTTP/1.1 ``GET``, undoes the chunked transfer encoding and splits the body into SSE
events itself. It parses JSON only where a figure or a check needs it (not for ``progress``
events), checks a token's text against the expected text in place instead of keeping it, and
counts latencies into a histogram instead of a list.

``fanout.py`` runs ``python loadgen.py`` with one JSON job on stdin (see ``Job``) and reads
two JSON lines from stdout:

- ``{"phase": "connected", ...}`` once every client has its response headers (or failed);
- ``{"phase": "done", ...}`` the summary, once every client ended or the deadline passed.

Each client checks what a real client relies on: status 200, strictly increasing ids from
the start of the log (a skipped id is counted, not failed: a client that fell behind may get
consecutive tokens merged under the last id), exactly one terminal event and nothing after
it, the response ending after it, and the concatenated token text equal to the expected one.
Latency is receipt time minus append time, where the append time is the metadata event's
``created_at`` plus the event's ``t`` (both whole ms, same machine clock). Receipt time is
taken once per ``recv``, for every event it brought.

The process exits when its stdin closes, so a load generator never outlives ``fanout.py``.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import resource
import selectors
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

#: Latency histogram unit: 0.1 ms (append times themselves are whole ms).
BUCKETS_PER_MS = 10
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: ``json.loads`` of bytes detects their encoding in Python first, a large share of the parse.
_decode = json.JSONDecoder().raw_decode


#: One receive buffer for every socket of the process. ``sock.recv(256 KiB)`` would allocate
#: (mmap) and shrink a 256 KiB object per read, which costs more than the whole parse.
_READ_BUFFER = bytearray(256 * 1024)
_READ_VIEW = memoryview(_READ_BUFFER)


def decode(data: bytes) -> Any:
    return _decode(data.decode())[0]


@dataclass(frozen=True, slots=True)
class Stream:
    id: str
    #: The exact text every watcher must receive; ``None`` when unknown in advance (a stream
    #: that is cancelled mid-way): the client then keeps its text for ``fanout.py`` to check.
    expected: str | None
    #: The ``finish_reason`` the ``done`` must carry; ``None``: any ``done`` (``fanout.py``
    #: judges a generation it cancels, which may also have completed first).
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class Job:
    host: str
    port: int
    streams: list[Stream]
    #: One entry per client: the index of the stream it watches.
    clients: list[int]
    connect_concurrency: int
    connect_timeout: float
    #: Epoch seconds (``time.time()``) after which every client still open is given up on.
    deadline: float
    #: Scheduling niceness to add to this process (0: none).
    nice: int = 0

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Job:
        streams = [Stream(**s) for s in raw.pop("streams")]
        return cls(streams=streams, **raw)


class Tally:
    """What all clients of this process add up: shared so a client costs a few attributes."""

    def __init__(self) -> None:
        self.latency: dict[int, int] = {}
        self.events = 0
        self.reads = 0
        self.body_bytes = 0
        self.last_receipt = 0.0


def epoch_ms(rfc3339: str) -> int:
    """``2026-11-21T14:53:31.409Z`` → ms since the epoch, exactly (no float rounding)."""
    moment = datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    return (moment - EPOCH) // timedelta(milliseconds=1)


def _fields(block: bytes) -> tuple[int | None, bytes | None, bytes | None]:
    """``id``, ``event`` and ``data`` of one SSE event block (``data`` on one line, as both
    servers send it). The layout both servers write (``id``, ``event``, ``data``, in that
    order) is read with three searches; anything else goes through the general parse."""
    if block.startswith(b"id: "):
        first = block.find(b"\n")
        second = block.find(b"\n", first + 1)
        if (
            second > 0
            and block.startswith(b"event: ", first + 1)
            and block.startswith(b"data: ", second + 1)
            and block.find(b"\n", second + 1) < 0
        ):
            return int(block[4:first]), block[first + 8 : second], block[second + 7 :]
    seq = kind = data = None
    for line in block.split(b"\n"):
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"id":
            seq = int(value)
        elif name == b"event":
            kind = value
        elif name == b"data":
            data = value
    return seq, kind, data


class SseClient:
    """One ``GET /v1/streams/{id}/events`` from the beginning of the log, checked as it comes.

    A non-blocking socket driven by ``Driver``: ``start`` connects, ``writable`` sends the
    request, ``readable`` takes what arrived and feeds the HTTP and SSE parsers.
    """

    def __init__(self, job: Job, stream_index: int, tally: Tally) -> None:
        self.stream_index = stream_index
        self.stream = job.streams[stream_index]
        self.request = (
            f"GET /v1/streams/{self.stream.id}/events HTTP/1.1\r\n"
            f"Host: {job.host}:{job.port}\r\nAccept: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n\r\n"
        ).encode()
        self.tally = tally
        self.sock: socket.socket | None = None
        #: Response head received (or failed): the client no longer counts as connecting.
        self.resolved = False
        self.closed = False
        self.head = b""  # the response head until its blank line
        self.chunked = False
        self.raw = b""  # chunked framing not yet decoded
        self.chunk_left = 0  # data bytes left in the current chunk
        self.chunk_crlf = False  # the CRLF that ends a chunk's data is still due
        self.body = b""  # decoded body not yet split into events
        self.body_ended = False
        self.last_seq = 0
        self.gaps = 0  # ids skipped: coalesced catch-up tokens (allowed), or lost events
        self.created_ms: int | None = None
        self.position = 0  # how much of the expected text has been received
        self.pieces: list[str] = []  # the text, only when it is not known in advance
        self.terminal: str | None = None  # finish_reason of ``done``, or ``error:<code>``
        self.terminal_at: float | None = None
        self.problem: str | None = None

    # -- socket -----------------------------------------------------------------------------

    def start(self, selector: selectors.BaseSelector, host: str, port: int) -> None:
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        error = sock.connect_ex((host, port))
        if error not in (0, errno.EINPROGRESS):
            self.close(selector, f"connect: {os.strerror(error)}")
            return
        selector.register(sock, selectors.EVENT_WRITE, self)

    def writable(self, selector: selectors.BaseSelector) -> None:
        assert self.sock is not None
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self.close(selector, f"connect: {os.strerror(error)}")
            return
        try:
            self.sock.send(self.request)  # a few hundred bytes: an empty buffer takes them
        except OSError as exc:
            self.close(selector, f"send: {exc}")
            return
        selector.modify(self.sock, selectors.EVENT_READ, self)

    def readable(self, selector: selectors.BaseSelector, now: float) -> None:
        assert self.sock is not None
        try:
            size = self.sock.recv_into(_READ_BUFFER)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(selector, f"receive: {exc}")
            return
        if not size:
            self.close(selector, self._why_closed())
            return
        data = _READ_VIEW[:size].tobytes()
        self.tally.reads += 1
        self.tally.body_bytes += len(data)
        if not self.resolved:
            data = self._read_head(data)
            if self.closed or not data:
                if self.problem is not None:
                    self.close(selector)
                return
        body = self._dechunk(data) if self.chunked else data
        if body:
            self._split_events(body, now)
        if self.body_ended:
            self.close(selector)

    def close(self, selector: selectors.BaseSelector, problem: str | None = None) -> None:
        if problem is not None:
            self._fail(problem)
        self.resolved = True
        if self.closed:
            return
        self.closed = True
        if self.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(self.sock)
            self.sock.close()

    def _why_closed(self) -> str | None:
        if self.terminal is None:
            return "connection closed before a terminal event"
        if self.chunked and not self.body_ended:
            return "response cut after the terminal event"
        return None

    # -- HTTP -------------------------------------------------------------------------------

    def _read_head(self, data: bytes) -> bytes:
        head = self.head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self.head = head
            return b""
        self.head, rest, head = b"", head[end + 4 :], head[:end].lower()
        self.resolved = True
        status = head.split(b"\r\n", 1)[0].split(b" ")
        if len(status) < 2 or status[1] != b"200":
            self._fail(f"HTTP {status[1].decode() if len(status) > 1 else '?'}")
            return b""
        self.chunked = b"transfer-encoding: chunked" in head
        return rest

    def _dechunk(self, data: bytes) -> bytes:
        """Body bytes out of chunked framing; keeps a partial size line for the next call."""
        buf = self.raw + data if self.raw else data
        pos, end = 0, len(buf)
        pieces = []
        while pos < end:
            if self.chunk_left:
                take = min(self.chunk_left, end - pos)
                pieces.append(buf[pos : pos + take])
                pos += take
                self.chunk_left -= take
                self.chunk_crlf = not self.chunk_left
            elif self.chunk_crlf:
                if end - pos < 2:
                    break
                pos += 2
                self.chunk_crlf = False
            else:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    break
                size = int(buf[pos:line_end].split(b";", 1)[0], 16)
                pos = line_end + 2
                if size == 0:
                    self.body_ended = True
                    pos = end
                    break
                self.chunk_left = size
        self.raw = buf[pos:]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    # -- SSE --------------------------------------------------------------------------------

    def _split_events(self, body: bytes, now: float) -> None:
        buf = self.body + body if self.body else body
        if b"\r" in buf:  # sse-starlette ends lines with CRLF, the broker with LF
            buf = buf.replace(b"\r\n", b"\n")
        start = 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            self._event(buf[start:end], now)
            start = end + 2
        self.body = buf[start:]

    def _event(self, block: bytes, now: float) -> None:
        seq, kind, data = _fields(block)
        if seq is None:  # ``retry:``, a ``: ping`` comment
            return
        self.tally.events += 1
        self.tally.last_receipt = now
        if self.terminal is not None:
            self._fail(f"event {seq} after the terminal event")
        elif seq <= self.last_seq:
            self._fail(f"event {seq} after {self.last_seq}: ids must increase")
        elif seq != self.last_seq + 1:
            # A client that fell behind may get consecutive tokens merged under the last id
            # (docs/http.md, "Slow clients"): allowed, and counted. A lost event would also
            # fail the text check.
            self.gaps += 1
        self.last_seq = seq
        if kind == b"token" and data is not None:
            self._token(decode(data), now)
        elif kind == b"metadata" and data is not None:
            self.created_ms = epoch_ms(decode(data)["created_at"])
        elif kind in (b"done", b"error") and data is not None:
            payload = decode(data)
            self.terminal = (
                payload.get("finish_reason") if kind == b"done" else f"error:{payload.get('code')}"
            )
            self.terminal_at = now

    def _token(self, payload: dict[str, Any], now: float) -> None:
        text: str = payload["text"]
        if self.created_ms is None:
            self._fail("token before metadata")
        else:
            latency_ms = max(0.0, now * 1000 - (self.created_ms + payload["t"]))
            # 0.1 ms steps up to 100 ms, whole ms beyond: the histogram stays small.
            if latency_ms < 100:
                bucket = round(latency_ms * BUCKETS_PER_MS)
            else:
                bucket = round(latency_ms) * BUCKETS_PER_MS
            histogram = self.tally.latency
            histogram[bucket] = histogram.get(bucket, 0) + 1
        expected = self.stream.expected
        if expected is None:
            self.pieces.append(text)
        elif expected.startswith(text, self.position):
            self.position += len(text)
        else:
            self._fail(f"text differs from the expected text at offset {self.position}")
            self.position = len(expected) + 1  # stays wrong whatever follows

    # -- outcome ----------------------------------------------------------------------------

    def _fail(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem

    def _right_end(self) -> bool:
        wanted = self.stream.finish_reason
        if wanted is None:
            return self.terminal is not None and not self.terminal.startswith("error:")
        return self.terminal == wanted

    def ok(self) -> bool:
        if self.problem is not None or not self._right_end():
            return False
        expected = self.stream.expected
        return expected is None or self.position == len(expected)

    def why_not(self) -> str:
        if self.problem is not None:
            return self.problem
        if not self._right_end():
            return f"ended with {self.terminal!r}, not {self.stream.finish_reason or 'done'!r}"
        return "text shorter than the expected text"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Driver:
    """One selector loop for every client of the process (asyncio's per-read machinery would
    cost about as much as the parsing). It also watches stdin: EOF means ``fanout.py`` is
    gone, and the process exits."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.tally = Tally()
        self.clients = [SseClient(job, index, self.tally) for index in job.clients]
        self.selector = selectors.DefaultSelector()
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)

    def run(self) -> None:
        started = time.time()
        self._connect_all(started + self.job.connect_timeout)
        emit(
            {
                "phase": "connected",
                "connected": sum(1 for c in self.clients if c.problem is None),
                "seconds": time.time() - started,
                "cpu": cpu_seconds(),
            }
        )
        # Nothing cyclic is made per event: the collector would only cost time from here on.
        gc.disable()
        self._stream_until(self.job.deadline)
        emit(self.summary())

    def _connect_all(self, deadline: float) -> None:
        """Opens every connection, at most ``connect_concurrency`` waiting for their response
        head at once, so the server's accept backlog is never flooded (a dropped SYN costs a
        1 s retry)."""
        waiting = list(reversed(self.clients))
        connecting: list[SseClient] = []
        while waiting or connecting:
            while waiting and len(connecting) < self.job.connect_concurrency:
                client = waiting.pop()
                client.start(self.selector, self.job.host, self.job.port)
                connecting.append(client)
            self._poll(min(0.1, max(0.0, deadline - time.time())))
            connecting = [c for c in connecting if not c.resolved]
            if time.time() > deadline:
                for client in connecting + waiting:
                    client.close(self.selector, "no response head before the connect deadline")
                return

    def _stream_until(self, deadline: float) -> None:
        while any_open := [c for c in self.clients if not c.closed]:
            remaining = deadline - time.time()
            if remaining <= 0:
                for client in any_open:
                    client.close(self.selector, "deadline passed")
                return
            # Checking who is still open is O(clients): do it about once a second.
            until = time.time() + min(1.0, remaining)
            while (left := until - time.time()) > 0:
                self._poll(left)

    def _poll(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            client = key.data
            if client is None:
                if not os.read(key.fd, 4096):
                    sys.exit(1)  # fanout.py went away: nobody is left to read a summary
            elif mask & selectors.EVENT_READ:
                client.readable(self.selector, time.time())
            else:
                client.writable(self.selector)

    def summary(self) -> dict[str, Any]:
        clients, tally = self.clients, self.tally
        problems = Counter(c.why_not() for c in clients if not c.ok())
        watchers = [
            {
                "stream": c.stream_index,
                "terminal": c.terminal,
                "terminal_at": c.terminal_at,
                "text": "".join(c.pieces),
                "ok": c.ok(),
            }
            for c in clients
            if c.stream.expected is None
        ]
        return {
            "phase": "done",
            "clients": len(clients),
            "ok": sum(1 for c in clients if c.ok() and c.stream.expected is not None),
            "problems": dict(problems.most_common(10)),
            "clients_with_gaps": sum(1 for c in clients if c.gaps),
            "events": tally.events,
            "reads": tally.reads,
            "body_bytes": tally.body_bytes,
            "last_receipt": tally.last_receipt,
            "latency_hist": {str(k): v for k, v in tally.latency.items()},
            "watchers": watchers,
            "cpu": cpu_seconds(),
            "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }


def main() -> None:
    job = Job.from_json(json.loads(sys.stdin.buffer.readline()))
    if job.nice:
        os.nice(job.nice)
    Driver(job).run()


if __name__ == "__main__":
    main()
