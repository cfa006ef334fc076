"""The baseline of ``fanout.py``: the Redis-Streams-to-SSE relay people write by hand today.

A Starlette app with ``sse_starlette.EventSourceResponse`` and one endpoint,
``GET /v1/streams/{id}/events``: for each client, a loop of ``XREAD BLOCK`` on the
generation's log (``sb:{<id>}:log``, the broker's own data) from the client's position, on a
``redis.asyncio`` client with its default connection pool (unbounded: every blocked read holds
a connection of its own), each entry sent as one SSE event with the broker's ``id`` / ``event``
/ ``data``, until the terminal event. Nothing here is tuned: it is the code from a blog post,
so that the broker's figures have something honest to be compared with.

    python infra/bench/baseline_relay.py --port 8001 --redis-url redis://127.0.0.1:6390/0

It is what the broker replaces, not a part of it: no 404 for an unknown stream, no resume
rules beyond the position, no shutdown handling. ``GET /healthz`` answers once Redis does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from broker import keys
from broker.events import Event, seq_from_entry_id


def create_app(redis_url: str, *, block_ms: int, ping_seconds: float) -> Starlette:
    redis = aioredis.Redis.from_url(redis_url)

    async def relay(key: str, position: int) -> AsyncIterator[ServerSentEvent]:
        cursor = f"0-{position}"
        while True:
            reply = await redis.xread({key: cursor}, block=block_ms)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    cursor = entry_id
                    event = Event.decode(
                        fields[keys.EVENT_FIELD.encode()], seq_from_entry_id(entry_id)
                    )
                    data = json.dumps({**event.data, "t": event.t}, separators=(",", ":"))
                    yield ServerSentEvent(data=data, event=event.type.value, id=str(event.seq))
                    if event.terminal:
                        return

    async def events(request: Request) -> Response:
        last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        key = keys.log_key(request.path_params["stream_id"])
        return EventSourceResponse(relay(key, int(last or 0)), ping=ping_seconds)

    async def healthz(request: Request) -> Response:
        await redis.ping()
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await redis.aclose()

    return Starlette(
        routes=[
            Route("/v1/streams/{stream_id}/events", events),
            Route("/healthz", healthz),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument(
        "--heartbeat", type=float, default=15.0, help="XREAD BLOCK timeout and ping interval (s)"
    )
    args = parser.parse_args()
    app = create_app(
        args.redis_url, block_ms=int(args.heartbeat * 1000), ping_seconds=args.heartbeat
    )
    # The same server settings as `streambroker api` (one process, access log on), so the
    # comparison is between the two apps and nothing else.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
