"""``Watch``: following one stream's events, live, without ever losing the place.

``AsyncClient.watch(id)`` returns one. It yields typed events until the terminal one.
Whatever happens underneath (a dropped connection, a front-end restarting, a proxy that stops
sending without closing, a 503 while Redis fails over) it reconnects by itself with backoff
and jitter and resumes with ``Last-Event-ID``, so the caller sees every event exactly once,
in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from broker.client.errors import APIError, ClientError, ConnectionFailed
from broker.client.events import StreamEvent, parse_event
from broker.client.sse import Frame, SSEDecoder
from broker.numbers import int_or_none

if TYPE_CHECKING:
    from broker.client.aio import AsyncClient

#: Without the server's ``x-heartbeat-seconds``: its default heartbeat (15 s), twice, plus slack.
DEFAULT_HEARTBEAT_TIMEOUT = 35.0
#: Statuses worth retrying: over a limit, or a front-end / Redis that is not there right now.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(slots=True)
class WatchStats:
    """What one ``watch`` went through; read it during the watch or after."""

    connects: int = 0
    reconnects: int = 0
    heartbeat_timeouts: int = 0
    bytes_received: int = 0
    events: int = 0
    last_event_id: int = 0
    #: Seconds from the start of the watch to the first token event (``None`` before it).
    time_to_first_token: float | None = None
    started: float = field(default_factory=time.monotonic)
    #: Why the last connection ended early (``None`` while none has).
    last_error: str | None = None


class _Reconnect(Exception):
    """The connection ended or failed in a way a reconnect with the resume point cures."""

    def __init__(
        self, reason: str, retry_after: float | None = None, *, heartbeat: bool = False
    ) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        #: The connection went silent (no byte for longer than the heartbeat allows).
        self.heartbeat = heartbeat


class Watch:
    """An async iterator of ``StreamEvent`` with ``stats``; ``aclose()`` stops it early."""

    def __init__(
        self, client: AsyncClient, stream_id: str, *, last_event_id: int, replay: float | None
    ) -> None:
        self.client = client
        self.stream_id = stream_id
        self.replay = replay
        self.stats = WatchStats(last_event_id=last_event_id)
        self._retry_base: float | None = None
        #: When the broker was last heard from (a connection accepted, a byte): the
        #: give-up deadline counts from here, so a long quiet watch is never given up.
        self._heard_at = time.monotonic()
        self._connected = False
        self._events = self._run()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> StreamEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def _run(self) -> AsyncGenerator[StreamEvent, None]:
        failures = 0
        backoff = self.client.backoff
        while True:
            self._connected = False
            try:
                # aclosing: a generator left at the terminal event is closed here and now,
                # not by the garbage collector on a loop that may be gone (the sync Client).
                async with contextlib.aclosing(self._connect()) as events:
                    async for event in events:
                        yield event
                        if event.terminal:
                            return
                return  # 204: the stream had already ended at our resume point
            except _Reconnect as reason:
                self.stats.last_error = str(reason)
                self.stats.heartbeat_timeouts += reason.heartbeat
                # A connection the broker accepted was cut by the network: come back after
                # the server's retry. Only failures to connect at all back off further.
                failures = 1 if self._connected else failures + 1
                now, give_up_at = time.monotonic(), self._give_up_at()
                if give_up_at is not None and now >= give_up_at:
                    raise ConnectionFailed(
                        f"gave up on stream {self.stream_id}: no connection to it for "
                        f"{now - self._heard_at:.0f}s; last: {reason}"
                    ) from None
                delay = backoff.delay(failures, self._retry_base)
                if reason.retry_after is not None:
                    delay = max(delay, min(reason.retry_after, backoff.maximum))
                if give_up_at is not None:
                    delay = min(delay, give_up_at - now)  # a last try at the deadline
                await asyncio.sleep(delay)
                self.stats.reconnects += 1

    def _give_up_at(self) -> float | None:
        """When reconnecting stops: ``give_up_after`` past the last word from the broker,
        or sooner while no connection was ever accepted (``give_up_unanswered_after``)."""
        backoff = self.client.backoff
        limit = backoff.give_up_after
        if self.stats.connects == 0 and backoff.give_up_unanswered_after is not None:
            limit = backoff.give_up_unanswered_after
        return None if limit is None else self._heard_at + limit

    async def _connect(self) -> AsyncGenerator[StreamEvent, None]:
        """One connection: yields its events; ends normally only on 204 or after the
        terminal event; raises ``_Reconnect`` for anything a resume cures."""
        client, stats = self.client, self.stats
        params = client._token_params()
        if self.replay is not None:
            params["replay"] = f"{self.replay:g}"
        headers = {"Last-Event-ID": str(stats.last_event_id)} if stats.last_event_id else {}
        url = f"/v1/streams/{self.stream_id}/events"
        # The read timeouts are ours: the client's timeout for the answer's head (a peer
        # that accepts and never answers must not hold the watch), then the heartbeat
        # deadline between two chunks of the body.
        wait = client._http.timeout.read
        request = client._http.build_request(
            "GET",
            url,
            params=params,
            headers=headers,
            timeout=httpx.Timeout(client._http.timeout.connect or 30.0, read=None),
        )
        try:
            try:
                async with asyncio.timeout(wait):
                    response = await client._http.send(request, stream=True)
            except TimeoutError:
                raise _Reconnect(
                    f"the broker at {client.base_url} did not answer in {wait or 0:g}s"
                ) from None
            try:
                if response.status_code == 204:
                    return
                if response.status_code != 200:
                    await response.aread()
                    self._raise_for(response)
                self._check_event_stream(response)
                stats.connects += 1
                self._connected, self._heard_at = True, time.monotonic()
                async with contextlib.aclosing(self._events_of(response)) as events:
                    async for event in events:
                        yield event
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            raise _Reconnect(client._failure(exc)) from None
        raise _Reconnect("the connection ended before the terminal event")

    def _check_event_stream(self, response: httpx.Response) -> None:
        """A 200 that says it is something else (a web page where the broker should be)
        is not worth reconnecting to."""
        kind = response.headers.get("content-type")
        if kind is not None and not kind.startswith("text/event-stream"):
            raise ClientError(
                f"the broker at {self.client.base_url} answered stream {self.stream_id}'s "
                f"events with {kind.split(';')[0]}, not an event stream"
            )

    def _raise_for(self, response: httpx.Response) -> None:
        error = APIError.from_response(response)
        if response.status_code in RETRYABLE_STATUSES:
            raise _Reconnect(str(error), _retry_after(response))
        raise error

    async def _events_of(self, response: httpx.Response) -> AsyncGenerator[StreamEvent, None]:
        stats, decoder = self.stats, SSEDecoder()
        silence = self._heartbeat_timeout(response)
        async with contextlib.aclosing(_chunks(response, silence)) as chunks:
            async for chunk in chunks:
                self._heard_at = time.monotonic()
                stats.bytes_received += len(chunk)
                frames = decoder.feed(chunk)
                if decoder.retry_ms is not None:
                    self._retry_base = decoder.retry_ms / 1000
                for frame in frames:
                    event = self._accept(frame)
                    if event is not None:
                        yield event

    def _accept(self, frame: Frame) -> StreamEvent | None:
        """The frame as the next event, or ``None`` for one not to yield."""
        stats = self.stats
        event_id = int_or_none(frame.id or "", max_digits=19)
        if event_id is None:
            return None  # the broker ids every event, in ASCII digits; anything else is not ours
        if event_id <= stats.last_event_id:
            return None  # already yielded (a proxy replaying, say): never twice
        try:
            event = parse_event(event_id, frame.event, frame.data)
        except (ValueError, KeyError, TypeError) as exc:
            raise ClientError(f"stream {self.stream_id}: malformed event: {exc}") from exc
        stats.last_event_id = event_id
        stats.events += 1
        if stats.time_to_first_token is None and event.type == "token":
            stats.time_to_first_token = time.monotonic() - stats.started
        return event

    def _heartbeat_timeout(self, response: httpx.Response) -> float:
        if self.client.heartbeat_timeout is not None:
            return self.client.heartbeat_timeout
        try:
            return float(response.headers["x-heartbeat-seconds"]) * 2 + 1
        except (KeyError, ValueError):
            return DEFAULT_HEARTBEAT_TIMEOUT


async def _chunks(response: httpx.Response, silence: float) -> AsyncGenerator[bytes, None]:
    """The body's chunks; ``_Reconnect`` when none comes for ``silence`` seconds."""
    chunks = response.aiter_bytes()
    while True:
        try:
            # Any byte, a ': ping' included, proves the connection alive.
            async with asyncio.timeout(silence):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _Reconnect(
                f"nothing received for {silence:g}s (heartbeat)", heartbeat=True
            ) from None
        yield chunk


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None
