"""The connection under a response, through a real uvicorn (httptools) server in this
process and real sockets: ``TransportSink`` finds it behind the server's ``send``, sees it
push back when the client stops reading, and a response cut off after its send timeout
resets the connection instead of leaving it open with its unsent buffers."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import anyio
import pytest
import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from api.app import BrokerApp
from api.live_writes import SERVER_SEND, TransportSink, chunked
from api.sse import EventStreamResponse
from tests.support.redis_server import free_port
from tests.support.waiting import eventually_async

pytestmark = pytest.mark.anyio

#: Written until the connection pushes back: the kernel takes megabytes first.
MEGABYTE = b"x" * (1 << 20)
MOST_WRITES = 256


class Server:
    def __init__(self, port: int) -> None:
        self.port = port
        #: What the endpoints saw, for the test to check.
        self.seen: dict[str, object] = {}


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server(free_port())

    async def push_back(request: Request) -> Response:
        return _PushBack(state)

    async def endless(request: Request) -> Response:
        async def frames() -> AsyncIterator[bytes]:
            for _ in range(MOST_WRITES):  # far more than the connection takes
                yield b"data: " + MEGABYTE + b"\n\n"

        response = EventStreamResponse(frames(), send_timeout=0.5)  # type: ignore[arg-type]
        state.seen["response"] = response
        return response

    app = BrokerApp(routes=[Route("/push-back", push_back), Route("/endless", endless)])
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=state.port,
        http="httptools",
        loop="none",
        lifespan="off",
        log_config=None,  # its records reach pytest's caplog
    )
    served = uvicorn.Server(config)
    task = asyncio.create_task(served.serve())
    await eventually_async(lambda: served.started, what="the server started")
    yield state
    served.should_exit = True
    await task


class _PushBack(Response):
    """Writes through the sink until the connection pushes back, then resets it."""

    def __init__(self, state: Server) -> None:
        super().__init__()
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        sink = TransportSink.of(scope[SERVER_SEND])
        self.state.seen["sink"] = sink
        assert sink is not None
        writes = 0
        while sink.writable() and writes < MOST_WRITES:
            sink.write(chunked(MEGABYTE))
            writes += 1
        self.state.seen["writes"] = writes
        sink.abort()


def frozen_client(port: int, path: str) -> socket.socket:
    """Sends the request and reads nothing (with a small receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
    return sock


def read_until_reset(sock: socket.socket) -> bool:
    """Reads everything; True when the connection ended with a reset, not a close."""
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    return False


async def test_the_sink_is_the_connection_and_sees_it_push_back(server: Server) -> None:
    sock = frozen_client(server.port, "/push-back")
    try:
        await eventually_async(lambda: "writes" in server.seen)
        assert isinstance(server.seen["sink"], TransportSink)
        writes = server.seen["writes"]
        assert isinstance(writes, int)
        assert writes < MOST_WRITES  # writable() turned False: the client stopped reading
        assert await anyio.to_thread.run_sync(read_until_reset, sock)
    finally:
        sock.close()


async def test_a_response_cut_off_by_its_send_timeout_resets_the_connection(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    sock = frozen_client(server.port, "/endless")
    try:
        await eventually_async(lambda: "response" in server.seen)
        response = server.seen["response"]
        assert isinstance(response, EventStreamResponse)
        await eventually_async(lambda: response.cut_off, what="the client was cut off")
        # Without the reset, the server would keep the connection (and the megabytes it
        # buffers for it) until the client read them: this read would wait, then time out.
        assert await anyio.to_thread.run_sync(read_until_reset, sock)
    finally:
        sock.close()
    # The server saw the connection go, not a response that ended without completing.
    assert "without completing" not in caplog.text
