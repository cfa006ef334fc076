"""An SSE test client on httpx + httpx-sse: read a stream, optionally hang up early."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from httpx_sse import aconnect_sse

from broker.client.sse import Frame, SSEDecoder


@dataclass(frozen=True)
class Received:
    id: int
    type: str
    data: dict[str, Any]


@dataclass
class Watch:
    status: int
    events: list[Received] = field(default_factory=list)

    @property
    def ended(self) -> bool:
        return bool(self.events) and self.events[-1].type in ("done", "error")


async def watch(
    client: httpx.AsyncClient,
    base_url: str,
    stream_id: str,
    *,
    after: int | None = None,
    via: Literal["header", "query"] = "header",
    stop_after: int | None = None,
) -> Watch:
    """Read ``stream_id``'s events from ``after``; hang up after ``stop_after`` events."""
    url = f"{base_url}/v1/streams/{stream_id}/events"
    headers, params = {}, {}
    if after is not None:
        if via == "header":
            headers["Last-Event-ID"] = str(after)
        else:
            params["last_event_id"] = str(after)
    async with aconnect_sse(client, "GET", url, headers=headers, params=params) as source:
        result = Watch(status=source.response.status_code)
        if result.status != 200:
            return result
        async for sse in source.aiter_sse():
            # httpx-sse hands over every block, empty ones too: the broker must send none
            # (no `retry:` or `: ping` block of its own), as its users' loops would choke.
            assert sse.data, f"an empty SSE event: {sse!r}"
            result.events.append(Received(int(sse.id), sse.event, json.loads(sse.data)))
            if result.ended or (stop_after is not None and len(result.events) >= stop_after):
                break
    return result


def token_text(events: list[Received]) -> str:
    return "".join(e.data["text"] for e in events if e.type == "token")


def decode_sse(body: str | bytes) -> list[Frame]:
    """Every event of a whole SSE body, as a standard decoder dispatches them."""
    return SSEDecoder().feed(body.encode() if isinstance(body, str) else body)


def merged_text_deltas(received: list[tuple[str | None, str]]) -> list[Any]:
    """The payloads of ``(id, data)`` frames, each run of ai-sdk text deltas of one part
    merged into one: what a reader that caught up (merging tokens) and a live one must agree on."""
    out: list[Any] = []
    for _, data in received:
        chunk = data if data == "[DONE]" else json.loads(data)
        previous = out[-1] if out else None
        if (
            isinstance(chunk, dict)
            and chunk.get("type") == "text-delta"
            and isinstance(previous, dict)
            and previous.get("type") == "text-delta"
            and previous["id"] == chunk["id"]
        ):
            out[-1] = {**previous, "delta": previous["delta"] + chunk["delta"]}
        else:
            out.append(chunk)
    return out
