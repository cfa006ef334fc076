"""A Sentinel that keeps naming one master, whatever happens: what a Sentinel on the minority
side of a partition answers (it cannot take part in a failover, so it never hears of one).

Real Sentinels cannot be partitioned from each other on one host without root and network
namespaces, so this stand-in speaks just enough of the protocol for a client looking for
the master: ``SENTINEL GET-MASTER-ADDR-BY-NAME`` answers the fixed address, ``PING``
answers ``PONG``, anything else ``OK``. It runs in the test's own event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class StaleSentinel:
    def __init__(self, master: tuple[str, int]) -> None:
        self.master = master
        #: How many times a client asked it for the master.
        self.asked = 0
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (command := await _read_command(reader)) is not None:
                writer.write(self._answer(command))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _answer(self, command: list[bytes]) -> bytes:
        words = [part.upper() for part in command[:2]]
        if words == [b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME"]:
            self.asked += 1
            host, port = self.master
            return b"*2\r\n" + _bulk(host.encode()) + _bulk(str(port).encode())
        if words[:1] == [b"PING"]:
            return b"+PONG\r\n"
        return b"+OK\r\n"


async def _read_command(reader: asyncio.StreamReader) -> list[bytes] | None:
    """One RESP array of bulk strings (what redis-py sends); None at the end."""
    header = await reader.readline()
    if not header:
        return None
    parts = []
    for _ in range(int(header[1:])):
        length = int((await reader.readline())[1:])
        parts.append((await reader.readexactly(length + 2))[:-2])
    return parts


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


@asynccontextmanager
async def stale_sentinel(master: tuple[str, int]) -> AsyncIterator[StaleSentinel]:
    """A ``StaleSentinel`` listening on a free port of 127.0.0.1 (its ``port``)."""
    stub = StaleSentinel(master)
    server = await asyncio.start_server(stub._serve, "127.0.0.1", 0)
    stub.port = server.sockets[0].getsockname()[1]
    try:
        yield stub
    finally:
        server.close()
        await server.wait_closed()
