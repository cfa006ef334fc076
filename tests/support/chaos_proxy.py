"""A TCP proxy that cuts connections: each one is closed, both ways, after a random number of
bytes came back from the server. It stands between clients and an api process to prove that
resuming with ``Last-Event-ID`` survives networks that drop connections at any byte.

With ``stall=True`` it does worse: after those bytes it forwards nothing more but keeps the
connection open, as a dead NAT or a wedged proxy does; only a client that times out silence
(the heartbeat) gets past it."""

from __future__ import annotations

import asyncio
import contextlib
import random
from types import TracebackType


class ChaosProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        cut_after: tuple[int, int],
        seed: int = 0,
        stall: bool = False,
        cut_connections: int | None = None,
    ) -> None:
        """``cut_after``: the range (inclusive) of response bytes a connection carries
        before it is cut (or, with ``stall``, goes silent). ``cut_connections``: only the
        first so many connections are cut; the rest pass whole."""
        self.cut_connections = cut_connections
        self.upstream_port = upstream_port
        self.stall = stall
        self.cut_after = cut_after
        self.random = random.Random(seed)
        self.cuts = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> ChaosProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        budget: int | None = self.random.randint(*self.cut_after)
        if self.cut_connections is not None and self.connections > self.cut_connections:
            budget = None
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        upstream = asyncio.create_task(self._pipe(client_r, server_w, None))
        try:
            cut = await self._pipe(server_r, client_w, budget)
            if cut:
                self.cuts += 1
                if self.stall:
                    # Silent but open until the client gives up on it (closes its side).
                    await upstream
        finally:
            upstream.cancel()
            for writer in (client_w, server_w):
                writer.transport.abort()  # no FIN handshake: a dropped connection
            with contextlib.suppress(asyncio.CancelledError):
                await upstream
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: int | None
    ) -> bool:
        """Copy until EOF (False), or until ``budget`` bytes went through (True: cut)."""
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                data = await reader.read(65536)
                if not data:
                    return False
                if budget is not None and len(data) >= budget:
                    writer.write(data[:budget])
                    await writer.drain()
                    return True
                writer.write(data)
                await writer.drain()
                if budget is not None:
                    budget -= len(data)
        return False
