"""A TCP proxy in front of Redis that can take the store away for a moment: a *blip*.

``proxy.blip(1.5)`` drops every open connection (a reset, no goodbye) and closes the
listening socket, so new connections are refused, for that long; then it listens again on
the same port. To the processes behind it this is what a Redis restart, a network partition
that heals, or the seconds of a failover look like.

The proxy runs on an event loop of its own, in a thread, so that a test may block its own
loop (starting processes, waiting for them) without stalling the traffic. Use it as
``with BlipProxy(port) as proxy``; from async code, ``await anyio.to_thread.run_sync(
proxy.blip, 1.5)``.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.background import Background, LoopThread
from tests.support.redis_server import free_port


class BlipProxy(Background):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.blips = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = LoopThread()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._loop.start()
        self._loop.run(self._listen())

    def stop(self) -> None:
        self._loop.run(self._close())
        self._loop.stop()

    def blip(self, seconds: float) -> None:
        """Drop every connection and refuse new ones for ``seconds`` (blocks that long)."""
        self.blips += 1
        self._loop.run(self._blip(seconds))

    async def _blip(self, seconds: float) -> None:
        await self._stop_listening()
        self._drop_all()
        await asyncio.sleep(seconds)  # the outage itself: its length is the point
        await self._listen()

    async def _close(self) -> None:
        await self._stop_listening()
        self._drop_all()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._pipes):
            task.cancel()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.transport.abort()
            return
        self._writers |= {client_w, server_w}
        pipes = [
            asyncio.create_task(_pipe(client_r, server_w)),
            asyncio.create_task(_pipe(server_r, client_w)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
                self._pipes.discard(task)
            for writer in (client_w, server_w):
                writer.transport.abort()
                self._writers.discard(writer)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
