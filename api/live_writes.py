"""Live writes: the reader hub writes new events straight to a client's connection.

A client at the live tail with nothing pending needs no task of its own to receive an event:
the bytes are the same for every watcher of the stream, encoded once, and what is left per
client is one ``transport.write``. Waking each client's task to make that write instead (its
coroutine chain, three ASGI send wrappers, uvicorn's ``send``) cost several times the write
itself, and under fan-out it made the api's latency grow with its client count.

So while a client's task sleeps at the live tail, its subscription carries a ``LiveWriter``
and the hub writes each batch of new events for it as it reads them (``Subscription.offer``).
The task wakes only for what a write cannot decide: a gap between its cursor and the batch
(read from the log), a connection that pushes back (uvicorn's flow control: the task's own
``send`` waits for it, under the send timeout), the stream's end (finish the response), and
shutdown. While it is awake the writer is unarmed and frames queue in its buffer as they
always did, so the two paths never interleave out of order.

Direct writes need the connection under the response: ``TransportSink.of`` finds it behind
the ASGI ``send`` that uvicorn's httptools protocol (the one ``streambroker api`` runs) gives
the app, and only when the response uses chunked framing, which is what the sink writes.
Anything else (another server, h11, a test transport) gets ``None`` and every write goes
through the task as before: same bytes, only slower.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.types import Send

if TYPE_CHECKING:
    from api.subscription import Batch
    from api.watch import Reader

# uvicorn's protocol on its C parser (httptools, a dependency of this package): the one
# ``streambroker api`` runs, and the only one whose connection is written to directly.
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as _HttpToolsCycle

#: Where ``BrokerApp`` leaves, in each request's scope, the ``send`` the server gave it (the
#: one below every middleware's wrapper): the sink is found behind it.
SERVER_SEND = "streambroker.server_send"


def chunked(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk (RFC 9112 §7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class TransportSink:
    """The connection under one event stream's response, written to without the ASGI layers."""

    __slots__ = ("_cycle", "_transport")

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._transport = cycle.transport

    @classmethod
    def of(cls, send: Send | None) -> TransportSink | None:
        """The sink behind uvicorn's httptools ``send`` once the response has started with
        chunked framing; None for any other server, protocol or framing."""
        cycle = getattr(send, "__self__", None)
        if type(cycle) is not _HttpToolsCycle:
            return None
        if not cycle.response_started or cycle.chunked_encoding is not True:
            return None
        return cls(cycle)

    def writable(self) -> bool:
        """The connection takes a write now: it is open, the response is not over, and its
        send buffer is below uvicorn's high-water mark (otherwise the task's ``send`` waits).

        The transport is asked too: uvicorn marks only its *current* request disconnected,
        and a client that pipelined another request behind the event stream's has moved
        that mark on to the next one."""
        cycle = self._cycle
        return not (
            cycle.flow.write_paused
            or cycle.disconnected
            or cycle.response_complete
            or self._transport.is_closing()
        )

    def write(self, chunk: bytes) -> bool:
        """``chunk``: body bytes framed as HTTP chunks already (``chunked``). False when the
        connection refused it (it closed under the check): the client's own task then meets
        that, and it fails alone, never the hub's fan-out to everyone else."""
        try:
            self._transport.write(chunk)
        except (RuntimeError, OSError):  # uvloop raises on a closed transport
            return False
        return True

    def abort(self) -> None:
        """Drop the connection and whatever it still buffers, here and in the kernel: a
        reset, not a close, which would still send the kernel's buffer (megabytes, to a
        client that takes nothing) before it ended the connection."""
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()


@dataclass
class DirectWrites:
    """What an event stream's response and its frames share to allow live writes.

    The response sets ``sink`` once the connection is open and the opening lines are out
    (``api.sse``); until then, and for good when it stays None, the task writes everything.
    """

    #: The client's heartbeat as its frames would send it (``api.sse``: a comment line, or
    #: an event).
    ping: bytes
    #: Leave the stream's terminal event to the task: the response must run its ``ending``
    #: hook (give back a counted connection slot) before the client can read the end.
    hold_end: bool = False
    sink: TransportSink | None = field(default=None, repr=False)
    #: Lines that must lead the first event, whoever writes it (``retry:``); taken once.
    lead: bytes = b""

    def take_lead(self) -> bytes:
        lead, self.lead = self.lead, b""
        return lead


class LiveWriter:
    """Writes the hub's batches for one client, advancing that client's ``Reader``."""

    __slots__ = ("_direct", "_ping_chunk", "_reader")

    def __init__(self, direct: DirectWrites, reader: Reader) -> None:
        self._direct = direct
        self._reader = reader
        self._ping_chunk = chunked(direct.ping)

    @property
    def ready(self) -> bool:
        return self._direct.sink is not None

    def write(self, batch: Batch) -> int | None:
        """Write what of ``batch`` the client lacks; the number of events written, or None
        when the client's task must take the batch instead."""
        sink = self._direct.sink
        reader = self._reader
        cursor = reader.cursor
        if batch.last_seq <= cursor:
            return 0  # an overlap with what the task read from the log
        if (
            sink is None
            or batch.first_seq > cursor + 1
            or not batch.contiguous
            or (batch.terminal and self._direct.hold_end)
            or not sink.writable()
        ):
            return None
        lead = self._direct.lead
        if lead or batch.first_seq <= cursor:
            body = lead + batch.data_after(cursor)
            if not sink.write(chunked(body)):
                return None
            self._direct.lead = b""
            size = len(body)
        elif sink.write(batch.chunk):  # the common case: the bytes every client gets
            size = len(batch.data)
        else:
            return None
        written = batch.last_seq - cursor
        reader.advance(batch.last_seq, written, ended=batch.terminal, size=size)
        return written

    def ping(self) -> bool:
        """Write the heartbeat line; False when the task must (the connection pushes back)."""
        sink = self._direct.sink
        if sink is None or not sink.writable() or not sink.write(self._ping_chunk):
            return False
        self._reader.delivery.live_bytes += len(self._direct.ping)
        return True
