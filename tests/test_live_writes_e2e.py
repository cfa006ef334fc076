"""Live writes through real processes: ``streambroker api`` (uvicorn with its httptools
protocol) writes live events straight to the connections of the clients at the tail, with
the very bytes a client reading the log later gets; and a connection that breaks under
those writes ends alone."""

from __future__ import annotations

import asyncio
import socket

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from broker.events import Event, EventType
from broker.generation_log import GenerationLog
from tests.support.generations import claimed, create
from tests.support.processes import Launcher
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually_async
from tests.test_metrics import value

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]

LIVE_WRITES = "streambroker_events_written_live_total"


async def read_body(client: httpx.AsyncClient, url: str) -> bytes:
    async with client.stream("GET", url) as response:
        assert response.status_code == 200
        return b"".join([chunk async for chunk in response.aiter_bytes()])


async def test_live_readers_get_the_bytes_a_reader_of_the_log_gets(
    launch: Launcher,
) -> None:
    api = launch.api_and_worker()
    async with httpx.AsyncClient(timeout=30) as client:
        before = (await client.get(f"{api.url}/metrics")).text
        stream_id = await create(client, api.url, max_tokens=200, rate=100)
        url = f"{api.url}/v1/streams/{stream_id}/events"
        bodies: list[bytes] = []

        async def live_reader() -> None:
            bodies.append(await read_body(client, url))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as readers:
                for _ in range(20):
                    readers.start_soon(live_reader)
            late = await read_body(client, url)  # all of it from the log, by its own task
        after = (await client.get(f"{api.url}/metrics")).text

    def events_of(body: bytes) -> bytes:
        return body.replace(b": ping\n", b"")  # heartbeats come whenever they come

    events = late.count(b"\nid: ")
    assert b"event: done" in late
    assert events > 20
    assert all(events_of(body) == events_of(late) for body in bodies)
    assert events_of(late).startswith(b"retry: ")
    # Most of the 20 readers' events went out as live writes, not through their tasks.
    assert value(after, LIVE_WRITES) - value(before, LIVE_WRITES) >= 20 * events / 2


class RawReader:
    """An SSE client on a raw connection: counts heartbeats, and knows when the chunked
    response ended."""

    def __init__(self) -> None:
        self.received = b""
        self.ended = False

    @property
    def pings(self) -> int:
        return self.received.count(b": ping\n")

    async def read(self, port: int, path: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode())
        try:
            while chunk := await reader.read(65536):
                self.received += chunk
                if self.received.endswith(b"\r\n0\r\n\r\n"):  # the response's last chunk
                    self.ended = True
                    return
        finally:
            writer.close()


async def test_a_client_gone_with_a_request_pipelined_costs_no_one_their_pings_or_end(
    launch: Launcher, redis_server: RedisServer
) -> None:
    """uvicorn marks only the *current* request of a connection disconnected: a client that
    pipelined a second request behind its event stream and hung up leaves the stream's
    request looking open. The hub's writes to it then fail; that must end that client
    alone, not the fan-out (the others' events, their end) or the heartbeats."""
    api = launch.api({"BROKER_HEARTBEAT_SECONDS": "0.2"})
    store = aioredis.Redis.from_url(redis_server.url)
    try:
        stream_id, writer = await claimed(GenerationLog(store, retention_seconds=600))
        await writer.append(Event(EventType.METADATA, {"id": stream_id}, t=0))
        path = f"/v1/streams/{stream_id}/events"
        readers = [RawReader() for _ in range(20)]
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                for reader in readers:
                    group.start_soon(reader.read, api.port, path)
                gone = socket.create_connection(("127.0.0.1", api.port))
                pipelined = "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
                gone.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n{pipelined}".encode())
                await eventually_async(lambda: all(b"id: 1\n" in r.received for r in readers))
                await anyio.to_thread.run_sync(gone.recv, 65536)  # its stream is open…
                gone.close()  # …and it is gone
                pings = [reader.pings for reader in readers]
                await eventually_async(
                    lambda: all(r.pings >= p + 3 for r, p in zip(readers, pings, strict=True)),
                    what="heartbeats go on",
                )
                usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
                await writer.append(
                    Event(EventType.TOKEN, {"text": "hi", "tokens": 1}, t=1),
                    Event(EventType.DONE, {"finish_reason": "stop", "usage": usage}, t=2),
                )
        assert all(reader.ended for reader in readers)
        assert all(b"event: done" in reader.received for reader in readers)
    finally:
        await store.aclose()
