"""Network chaos: clients read through a proxy that cuts every connection after a random
number of bytes (also inside the response head, or mid-event) and resume each time with
``Last-Event-ID``. Across more than a thousand cuts every client ends with the exact text,
strictly increasing ids and one terminal event."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import anyio
import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.support.chaos_proxy import ChaosProxy
from tests.support.generations import create, expected_text
from tests.support.processes import ApiProcess, Launcher
from tests.support.sse import Received, token_text

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]

STREAMS = 8
READERS_PER_STREAM = 8
TOKENS = 400
MIN_CUTS = 1000


#: Every reconnect on a new connection, as many at once as the readers want.
LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=0)


@dataclass
class Reader:
    events: list[Received] = field(default_factory=list)
    connections: int = 0

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1].type in ("done", "error")


async def read_through_cuts(client: httpx.AsyncClient, url: str, reader: Reader) -> None:
    """What a resuming client does: reconnect after any failure, from the last id it has."""
    while not reader.ended:
        reader.connections += 1
        headers = {"Last-Event-ID": str(reader.events[-1].id)} if reader.events else {}
        try:
            async with aconnect_sse(client, "GET", url, headers=headers) as source:
                if source.response.status_code == 204:
                    return
                assert source.response.status_code == 200
                async for sse in source.aiter_sse():
                    if sse.data:
                        reader.events.append(Received(int(sse.id), sse.event, json.loads(sse.data)))
                        if reader.ended:
                            return
        except httpx.HTTPError:
            pass  # cut: resume


async def test_every_client_ends_with_the_exact_text_across_a_thousand_cuts(
    launch: Launcher,
) -> None:
    api = launch.api_and_worker({"BROKER_RETRY_MS": "0"})
    async with httpx.AsyncClient(timeout=httpx.Timeout(20), limits=LIMITS) as client:
        readers, cuts = await read_every_stream_through_cuts(client, api)
    for (s, i), reader in readers.items():
        ids = [e.id for e in reader.events]
        assert ids == sorted(set(ids)), f"stream {s} reader {i}: ids repeat or go back"
        assert [e.type for e in reader.events].count("done") == 1
        assert reader.events[-1].type == "done"
        assert token_text(reader.events) == expected_text(TOKENS, seed=s)
    print(f"\n{cuts} cuts, {sum(r.connections for r in readers.values())} connections")
    assert cuts >= MIN_CUTS


async def read_every_stream_through_cuts(
    client: httpx.AsyncClient, api: ApiProcess
) -> tuple[dict[tuple[int, int], Reader], int]:
    """``READERS_PER_STREAM`` readers of each of ``STREAMS`` streams, through a cutting proxy;
    the readers, and how many cuts the proxy made."""
    streams = [
        await create(client, api.url, max_tokens=TOKENS, rate=200, seed=seed)
        for seed in range(STREAMS)
    ]
    readers = {(s, i): Reader() for s in range(STREAMS) for i in range(READERS_PER_STREAM)}
    async with ChaosProxy(api.port, cut_after=(1, 900), seed=7) as proxy:
        base = f"http://127.0.0.1:{proxy.port}"
        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                for (s, _), reader in readers.items():
                    url = f"{base}/v1/streams/{streams[s]}/events"
                    group.start_soon(read_through_cuts, client, url, reader)
        return readers, proxy.cuts
