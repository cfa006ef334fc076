"""``AsyncClient``: the broker's HTTP API for Python services.

One method per endpoint, each a request and its answer (or ``APIError``). Following a stream
live, with reconnects and resume, is ``Watch``'s (``broker.client.watch``); ``watch(id)``
starts one.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from broker.client.backoff import Backoff
from broker.client.errors import APIError, ClientError, ConnectionFailed, one_line
from broker.client.watch import Watch
from broker.closing import AsyncCloseable
from broker.numbers import int_or_none

DEFAULT_URL = "http://127.0.0.1:8000"
#: Times a create is sent again after its answer was lost or a front-end could not take it.
CREATE_RETRIES = 3
#: What a create is sent again after: a proxy without a healthy api behind it (502, 504), or
#: a broker whose Redis is away for a moment (503). Any other error is the request's own.
_CREATE_RETRY_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class Created:
    id: str
    status: str
    url: str
    events_url: str
    #: Lets whoever holds it read this one stream (only when the broker has auth on).
    read_token: str | None
    raw: dict[str, Any] = field(repr=False)
    #: An earlier send of this create (same ``Idempotency-Key``) made the generation.
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    data: list[dict[str, Any]]
    next_cursor: str | None


class AsyncClient(AsyncCloseable):
    """One broker, one ``httpx.AsyncClient`` (its connection pool is reused by every call).

    ``api_key`` is sent as ``Authorization: Bearer``; ``token`` (a read token) is for a
    client that may only read one stream. Use it as ``async with AsyncClient(...) as sb``.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        backoff: Backoff | None = None,
        heartbeat_timeout: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.backoff = backoff or Backoff()
        #: ``None``: from the server's ``x-heartbeat-seconds`` (twice it, plus a second).
        self.heartbeat_timeout = heartbeat_timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the API --------------------------------------------------------------------------

    async def create(
        self,
        model: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int | None = None,
        metadata: Mapping[str, str] | None = None,
        fake: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Created:
        """Start a generation.

        Sent with an ``Idempotency-Key`` (``idempotency_key``, or a new random one), and so
        sent again, up to ``CREATE_RETRIES`` times, when its answer is lost (the connection
        dropped, the broker did not answer in time) or a front-end could not take it (502,
        503, 504): the broker answers a repeated key with the generation the first send
        made, never a second one. Pass your own key to retry across processes or restarts.
        """
        body: dict[str, Any] = {"model": model, "messages": list(messages), **params}
        for name, value in (("max_tokens", max_tokens), ("metadata", metadata), ("fake", fake)):
            if value is not None:
                body[name] = value
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        for failures in range(1, CREATE_RETRIES + 2):
            try:
                response = await self._send("POST", "/v1/streams", json=body, headers=headers)
                break
            except (ConnectionFailed, APIError) as exc:
                retryable = not isinstance(exc, APIError) or exc.status in _CREATE_RETRY_STATUSES
                if failures > CREATE_RETRIES or not retryable:
                    raise
                await asyncio.sleep(self.backoff.delay(failures))
        answer = self._parsed(response, "POST", "/v1/streams")
        return Created(
            id=answer["id"],
            status=answer["status"],
            url=answer["url"],
            events_url=answer["events_url"],
            read_token=answer.get("read_token"),
            raw=answer,
            replayed=response.headers.get("idempotent-replayed") == "true",
        )

    async def get(self, stream_id: str) -> dict[str, Any]:
        """The stream's state (``GET /v1/streams/{id}``), its text so far included."""
        result: dict[str, Any] = await self._json("GET", f"/v1/streams/{stream_id}")
        return result

    async def cancel(self, stream_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("POST", f"/v1/streams/{stream_id}/cancel")
        return result

    async def list_streams(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        metadata: Mapping[str, str] | None = None,
        created_after: str | None = None,
        created_before: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page:
        """One page of streams, newest first; pass ``next_cursor`` back for the next."""
        params: dict[str, str] = {}
        for name, value in (
            ("status", status),
            ("model", model),
            ("created_after", created_after),
            ("created_before", created_before),
            ("limit", None if limit is None else str(limit)),
            ("cursor", cursor),
        ):
            if value is not None:
                params[name] = value
        for key, value in (metadata or {}).items():
            params[f"metadata.{key}"] = value
        answer = await self._json("GET", "/v1/streams", params=params)
        return Page(data=answer["data"], next_cursor=answer.get("next_cursor"))

    async def export(self, stream_id: str) -> AsyncIterator[bytes]:
        """The stream's JSON-lines archive (``broker/archive.py``), line by line.

        An archive that ends short (the connection cut, or the last line is not the event
        the header announced) raises ``ClientError`` after its last line: what was yielded
        is then not the whole stream, and must not pass for it.
        """
        path = f"/v1/streams/{stream_id}/export"
        lines, last, expected = 0, b"", None
        try:
            async with self._http.stream("GET", path, params=self._token_params()) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise APIError.from_response(response)
                async for text in response.aiter_lines():
                    if not text:
                        continue
                    last = text.encode()
                    if lines == 0:
                        expected = self._archive_end(stream_id, last)
                    lines += 1
                    yield last + b"\n"
        except httpx.TransportError as exc:
            if lines == 0:
                raise ConnectionFailed(self._failure(exc)) from exc
            raise ConnectionFailed(
                f"the export of {stream_id} was cut short after {lines} lines: {self._failure(exc)}"
            ) from exc
        if lines == 0:
            raise ClientError(f"the broker answered the export of {stream_id} with nothing")
        ended_at = _event_id(last) if lines > 1 else 0
        if expected is not None and ended_at != expected:
            raise ClientError(
                f"the export of {stream_id} ended short of its last event ({expected}) "
                f"after {lines} lines"
            )

    def _archive_end(self, stream_id: str, header: bytes) -> int | None:
        """The last event id the archive's header announces (``None``: it does not say);
        ``ClientError`` when the line is no archive header (a wrong URL, a proxy's page)."""
        try:
            fields = json.loads(header)
            meta = fields["meta"]
        except (ValueError, KeyError, TypeError):
            raise ClientError(
                f"the broker at {self.base_url} answered the export of {stream_id} with "
                f"something that is not an archive: {one_line(header.decode())}"
            ) from None
        last_seq = meta.get("last_seq") if isinstance(meta, dict) else None
        return int_or_none(last_seq, max_digits=19) if isinstance(last_seq, str) else None

    async def import_archive(self, archive: bytes | AsyncIterable[bytes]) -> dict[str, Any]:
        """Import an exported stream (finished, under an id this broker does not have)."""
        result: dict[str, Any] = await self._json(
            "POST",
            "/v1/streams/import",
            content=archive,
            headers={"Content-Type": "application/x-ndjson"},
        )
        return result

    def watch(
        self, stream_id: str, *, last_event_id: int = 0, replay: float | None = None
    ) -> Watch:
        """Every event after ``last_event_id``, live, until the terminal one (or 204).

        ``replay``: re-emit a recorded stream with its original pacing scaled by this speed.
        """
        return Watch(self, stream_id, last_event_id=last_event_id, replay=replay)

    # -- plumbing -------------------------------------------------------------------------

    def _token_params(self) -> dict[str, str]:
        return {"token": self.token} if self.token else {}

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._parsed(await self._send(method, path, **kwargs), method, path)

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer, or ``ConnectionFailed`` (none came) / ``APIError`` (an error came)."""
        params = {**self._token_params(), **kwargs.pop("params", {})}
        try:
            response = await self._http.request(method, path, params=params, **kwargs)
        except httpx.TransportError as exc:
            raise ConnectionFailed(self._failure(exc)) from exc
        if response.status_code >= 400:
            raise APIError.from_response(response)
        return response

    def _parsed(self, response: httpx.Response, method: str, path: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ClientError(
                f"the broker at {self.base_url} answered {method} {path} with something that "
                f"is not JSON (HTTP {response.status_code}): {one_line(response.text)}"
            ) from None

    def _failure(self, exc: httpx.TransportError) -> str:
        """One line for a request that got no answer (httpx's own text may be empty)."""
        if isinstance(exc, httpx.ReadTimeout):
            seconds = self._http.timeout.read or 0.0
            return f"the broker at {self.base_url} did not answer in {seconds:g}s"
        return f"cannot reach the broker at {self.base_url}: {str(exc) or type(exc).__name__}"


def _event_id(line: bytes) -> int | None:
    try:
        event_id = json.loads(line)["id"]
    except (ValueError, KeyError, TypeError):
        return None
    return event_id if isinstance(event_id, int) else None
