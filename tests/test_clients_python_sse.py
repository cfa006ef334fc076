"""Python client libraries nobody here wrote, unchanged, against a live broker (Redis, an
api process, a worker, and the local OpenAI-compatible upstream for ``echo-model`` and
``tool-model``): the SSE libraries: ``httpx-sse`` (the loop of its README over every
wire format, and resuming with ``sse.id`` through a cutting proxy) and ``sseclient-py`` (the
broker's and OpenAI's formats, and resuming with ``event.id``).

Answers are compared with the exact text of the deterministic ``fake`` model (or the
upstream's scripted tool calls), never with what another client of the same broker received.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Protocol, TypeVar

import httpx
import pytest
import sseclient
from httpx_sse import ServerSentEvent, connect_sse

from tests.support.browser import ThreadedChaosProxy
from tests.support.client_libraries import CUT_RATE, PING_RATE, UpstreamBroker, fake
from tests.support.generations import MESSAGES, expected_text
from tests.support.resuming import Resumed, assert_strictly_increasing, read_resuming

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


class SSE(Protocol):
    """What httpx-sse's ``ServerSentEvent`` and sseclient-py's ``Event`` both have."""

    @property
    def event(self) -> str: ...
    @property
    def data(self) -> str: ...
    @property
    def id(self) -> str | None: ...


SSEType = TypeVar("SSEType", bound=SSE)


def answer_text(wire: str, events: list[tuple[str, dict[str, Any]]]) -> str:
    """The text of an answer from its (event, data) pairs in format ``wire``."""
    if wire == "broker":
        return "".join(data["text"] for event, data in events if event == "token")
    if wire == "ai-sdk":
        return "".join(data["delta"] for _, data in events if data["type"] == "text-delta")
    return "".join(
        choice["delta"].get("content") or "" for _, data in events for choice in data["choices"]
    )


def event_pairs(events: list[SSEType]) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each event but ``[DONE]``."""
    return [(e.event, json.loads(e.data)) for e in events if e.data != "[DONE]"]


def is_last(sse: SSE) -> bool:
    """The last event of a stream, in any format."""
    return sse.event in ("done", "error") or sse.data == "[DONE]"


def each_once(read: Resumed[SSEType], wire: str) -> list[SSEType]:
    """The events of a read across cuts, after checking that each came once, in order: with
    data and an id, ids strictly increasing. In OpenAI's format a resumed connection opens
    with a role chunk that has no SSE id and the resume point as ``event_id`` (checked, then
    dropped: the client has that id)."""
    assert read.cuts > 0, "no connection was cut: the test proved nothing"
    kept: list[SSEType] = []
    for connection in read.connections:
        events = connection.received
        if wire == "openai" and connection.resumed_from is not None and events:
            lead, *events = events
            assert not lead.id
            chunk = json.loads(lead.data)
            assert chunk["choices"][0]["delta"]["role"] == "assistant"
            assert chunk["event_id"] == connection.resumed_from
        kept += events
    assert all(e.data and e.id for e in kept)
    assert_strictly_increasing([e.id or "" for e in kept])
    return kept


def assert_whole_answer(wire: str, events: list[SSEType], text: str) -> None:
    """The exact text, the stream's opening and its end, in format ``wire``."""
    pairs = event_pairs(events)
    assert answer_text(wire, pairs) == text
    if wire == "broker":
        assert [event for event, _ in pairs].count("metadata") == 1
        assert (events[0].event, events[-1].event) == ("metadata", "done")
        assert pairs[-1][1]["finish_reason"] == "stop"
    else:
        assert events[-1].data == "[DONE]"
        assert len(pairs) == len(events) - 1
    if wire == "ai-sdk":
        assert (pairs[0][1]["type"], pairs[-1][1]["type"]) == ("start", "finish")
        assert pairs[-1][1]["finishReason"] == "stop"
    if wire == "openai":
        assert pairs[-1][1]["choices"][0]["finish_reason"] == "stop"
        assert [data["event_id"] for _, data in pairs] == [e.id for e in events[:-1]]


# -- httpx-sse -------------------------------------------------------------------------------------


class _Copy(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, into: bytearray) -> None:
        self.stream = stream
        self.into = into

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.stream:
            self.into += chunk
            yield chunk

    def close(self) -> None:
        self.stream.close()


class RecordingTransport(httpx.HTTPTransport):
    """httpx's transport, keeping a copy of the response bytes it hands over (what the SSE
    library parsed, as it came)."""

    def __init__(self) -> None:
        super().__init__()
        self.received = bytearray()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _Copy(response.stream, self.received)
        return response


@pytest.mark.parametrize("wire", ["broker", "openai", "ai-sdk", "openai-create"])
def test_the_httpx_sse_readme_loop_reads_every_format(broker: UpstreamBroker, wire: str) -> None:
    """The loop of httpx-sse's README, ``for sse in event_source.iter_sse():
    json.loads(sse.data)``, unchanged over a live stream with heartbeats between its events,
    in every format (``openai-create``: ``POST /v1/chat/completions`` itself). No event has
    empty data (the opening ``: ping`` and ``retry:`` are not events of their own); ``[DONE]``
    is the only data that is not JSON and ends the loop."""
    transport = RecordingTransport()
    events: list[ServerSentEvent] = []
    with httpx.Client(transport=transport, timeout=30) as client:
        if wire == "openai-create":
            body = {
                "model": "fake",
                "messages": MESSAGES,
                "max_tokens": 3,
                "stream": True,
                **fake(seed=41, rate=PING_RATE),
            }
            source = connect_sse(client, "POST", f"{broker.v1}/chat/completions", json=body)
        else:
            stream_id = broker.create(max_tokens=3, seed=41, rate=PING_RATE)
            url = f"{broker.v1}/streams/{stream_id}/events"
            source = connect_sse(client, "GET", url, params={"format": wire})
        with source as event_source:
            for sse in event_source.iter_sse():
                assert sse.data, f"an event with empty data: {sse!r}"
                events.append(sse)
                if sse.data == "[DONE]":
                    break
                json.loads(sse.data)
    raw = bytes(transport.received)
    assert raw.startswith(b": ping\n")
    first_event = raw.index(b"\n\n")
    assert b": ping\n" in raw[first_event:], "no heartbeat between events: nothing was proved"
    assert_strictly_increasing([sse.id for sse in events])
    assert_whole_answer(wire.removesuffix("-create"), events, expected_text(3, seed=41))
    if wire == "broker":
        assert events[0].retry == 2000
        assert event_pairs(events)[-1][1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("wire", ["broker", "openai", "ai-sdk"])
def test_httpx_sse_resumes_through_a_cutting_proxy_with_sse_id(
    broker: UpstreamBroker, wire: str
) -> None:
    """httpx-sse through a proxy that cuts every few hundred bytes; after each cut the loop
    reconnects with ``Last-Event-ID: <sse.id>`` of the last event: every event once (ids
    strictly increase), the exact text, the opening and the end of the stream."""
    stream_id = broker.create(max_tokens=40, seed=42, rate=CUT_RATE)
    with (
        ThreadedChaosProxy(broker.api.port, cut_after=(350, 900), seed=3) as proxy,
        httpx.Client(timeout=30) as client,
    ):
        url = f"{proxy.url}/v1/streams/{stream_id}/events"

        def connect(last: str | None) -> Iterator[ServerSentEvent]:
            headers = {"Last-Event-ID": last} if last else {}
            params = {"format": wire}
            with connect_sse(client, "GET", url, params=params, headers=headers) as source:
                if source.response.status_code == 204:
                    return  # the client has the end already
                for sse in source.iter_sse():
                    yield sse
                    if is_last(sse):
                        return

        read = read_resuming(
            connect, lambda sse: sse.id or None, cut_errors=(httpx.TransportError,)
        )
    assert proxy.cuts >= read.cuts
    assert_whole_answer(wire, each_once(read, wire), expected_text(40, seed=42))


# -- sseclient-py ---------------------------------------------------------------------------------


def sseclient_events(response: httpx.Response) -> Iterator[sseclient.Event]:
    """sseclient-py over an httpx streaming response (it takes any iterator of bytes)."""
    return sseclient.SSEClient(response.iter_bytes()).events()


@pytest.mark.parametrize("wire", ["broker", "openai"])
def test_sseclient_reads_every_event_with_its_data_and_id(
    broker: UpstreamBroker, wire: str
) -> None:
    """sseclient-py over a live stream with heartbeats: every event it dispatches has data and
    an id, the ids increase, the text is exact; in OpenAI's format ``[DONE]`` comes last and
    each chunk's ``event_id`` is its SSE id; in the broker's, the first event has ``retry``."""
    stream_id = broker.create(max_tokens=3, seed=51, rate=PING_RATE)
    url = f"{broker.v1}/streams/{stream_id}/events"
    with (
        httpx.Client(timeout=30) as client,
        client.stream("GET", url, params={"format": wire}) as response,
    ):
        events = list(sseclient_events(response))
    assert all(e.data and e.id for e in events)
    assert_strictly_increasing([e.id or "" for e in events])
    assert_whole_answer(wire, events, expected_text(3, seed=51))
    if wire == "broker":
        assert events[0].retry == "2000"


@pytest.mark.parametrize("wire", ["broker", "openai"])
def test_sseclient_resumes_after_cuts_with_event_id(broker: UpstreamBroker, wire: str) -> None:
    """sseclient-py through the cutting proxy, reconnecting with ``Last-Event-ID:
    <event.id>`` of the last event it dispatched: the exact text, every event once. (In
    OpenAI's format sseclient gives the id-less role chunk of a resumed connection
    ``id=None``, which leaves the resume point where it is.)"""
    stream_id = broker.create(max_tokens=40, seed=52, rate=CUT_RATE)
    with (
        ThreadedChaosProxy(broker.api.port, cut_after=(350, 1000), seed=4) as proxy,
        httpx.Client(timeout=30) as client,
    ):
        url = f"{proxy.url}/v1/streams/{stream_id}/events"

        def connect(last: str | None) -> Iterator[sseclient.Event]:
            headers = {"Last-Event-ID": last} if last else {}
            with client.stream("GET", url, params={"format": wire}, headers=headers) as response:
                if response.status_code == 204:
                    return
                for event in sseclient_events(response):
                    yield event
                    if is_last(event):
                        return

        read = read_resuming(connect, lambda event: event.id, cut_errors=(httpx.TransportError,))
    assert proxy.cuts >= read.cuts
    assert_whole_answer(wire, each_once(read, wire), expected_text(40, seed=52))
