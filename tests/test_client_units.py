"""The Python client's logic without a broker: the SSE decoder at every chunk boundary, the
typed events, backoff, and the watcher's reactions to statuses, silences and errors
(``httpx.MockTransport`` plays the server)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable

import anyio
import httpx
import pytest

from broker.client import (
    APIError,
    AsyncClient,
    Backoff,
    Client,
    ClientError,
    ConnectionFailed,
    Done,
    Progress,
    StreamFailed,
    Token,
    ToolCall,
    UnknownEvent,
)
from broker.client.events import parse_event
from broker.client.sse import Frame, SSEDecoder

pytestmark = pytest.mark.anyio

WIRE = (
    b"retry: 50\n\n"
    b'id: 1\nevent: metadata\ndata: {"model":"fake","t":1}\n\n'
    b": ping\n\n"
    b'id: 2\nevent: token\ndata: {"text":"h\xc3\xa9llo","tokens":1,"t":2}\n\n'
    b'id: 3\r\nevent: token\r\ndata: {"text":" w","tokens":1,"t":3}\r\n\r\n'
    b'id: 4\nevent: done\ndata: {"finish_reason":"stop","usage":null,"t":4}\n\n'
)


def decode_in_chunks(wire: bytes, size: int) -> tuple[list[Frame], int | None]:
    decoder, frames = SSEDecoder(), []
    for start in range(0, len(wire), size):
        frames += decoder.feed(wire[start : start + size])
    return frames, decoder.retry_ms


def test_sse_decoder_gives_the_same_frames_whatever_the_chunking() -> None:
    whole, retry = decode_in_chunks(WIRE, len(WIRE))
    assert [f.id for f in whole] == ["1", "2", "3", "4"]
    assert whole[1] == Frame(id="2", event="token", data='{"text":"héllo","tokens":1,"t":2}')
    assert retry == 50
    # Splits inside a UTF-8 character and between the CR and LF of a CRLF change nothing.
    for size in range(1, 40):
        assert decode_in_chunks(WIRE, size) == (whole, 50), size


def test_sse_decoder_joins_data_lines_and_ignores_comments_and_empty_frames() -> None:
    frames = SSEDecoder().feed(b": hello\n\nid: 7\ndata: a\ndata:b\n\nevent: x\n\n")
    assert frames == [Frame(id="7", event="message", data="a\nb")]


def test_events_are_typed_and_keep_their_data() -> None:
    token = parse_event(2, "token", '{"text":"hi","tokens":2,"t":5,"new_field":1}')
    assert token == Token(id=2, type="token", t=5, data=token.data, text="hi", tokens=2)
    assert token.data["new_field"] == 1
    assert not token.terminal
    progress = parse_event(3, "progress", '{"tokens":4,"tokens_per_second":9.5,"t":6}')
    assert isinstance(progress, Progress)
    assert progress.percent is None
    call = parse_event(4, "tool_call", '{"index":1,"id":"c","name":"f","arguments":"{","t":7}')
    assert isinstance(call, ToolCall)
    assert (call.call_id, call.name, call.arguments) == (
        "c",
        "f",
        "{",
    )
    failed = parse_event(5, "error", '{"code":"x","message":"m","retryable":true,"t":8}')
    assert isinstance(failed, StreamFailed)
    assert failed.terminal
    assert failed.retryable
    assert isinstance(parse_event(6, "done", '{"finish_reason":"stop","t":9}'), Done)
    assert isinstance(parse_event(7, "novel", '{"t":1}'), UnknownEvent)
    with pytest.raises(ValueError, match="not a JSON object"):
        parse_event(8, "token", "[1]")


def test_backoff_grows_to_its_ceiling_with_jitter() -> None:
    backoff = Backoff(initial=0.1, maximum=1.0)
    for failures, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (30, 1.0)]:
        delays = {backoff.delay(failures) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (failures, delays)
        assert len(delays) > 1  # jittered: clients cut together do not return together
    assert 0.5 <= backoff.delay(1, base=1.0) <= 1.0  # the server's retry: replaces initial


def sse(*events: tuple[int, str, dict[str, object]]) -> bytes:
    return b"".join(
        f"event: {kind}\ndata: {json.dumps(data)}\nid: {i}\n\n".encode() for i, kind, data in events
    )


class Server:
    """A scripted broker: each call of ``handle`` answers the next scripted response and
    records the ``Last-Event-ID`` it was asked for."""

    def __init__(self, *answers: Callable[[], httpx.Response]) -> None:
        self.answers = list(answers)
        self.resume_points: list[str | None] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.resume_points.append(request.headers.get("last-event-id"))
        return self.answers.pop(0)()


def client_for(server: Server, **options: object) -> AsyncClient:
    options.setdefault("backoff", Backoff(initial=0.001, maximum=0.01))
    return AsyncClient(
        "http://broker.test",
        transport=httpx.MockTransport(server.handle),
        **options,  # type: ignore[arg-type]
    )


def ok(body: bytes) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(200, content=body, headers={"x-heartbeat-seconds": "0.05"})


def status(code: int, **headers: str) -> Callable[[], httpx.Response]:
    body = {"error": {"code": f"c{code}", "message": "m"}}
    return lambda: httpx.Response(code, json=body, headers=headers)


class Stalling(httpx.AsyncByteStream):
    """Sends its bytes, then nothing, for ever: a dead connection that never closes."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body
        await asyncio.Event().wait()


async def collect(client: AsyncClient, stream_id: str = "s") -> list[int]:
    async with client:
        return [event.id async for event in client.watch(stream_id)]


async def test_watch_resumes_after_drops_and_5xx_without_repeating() -> None:
    server = Server(
        ok(sse((1, "metadata", {}), (2, "token", {"text": "a"}))),  # ends without terminal
        status(503, **{"retry-after": "0"}),
        ok(sse((2, "token", {"text": "a"}), (3, "token", {"text": "b"}))),  # 2 again: skipped
        lambda: httpx.Response(200, stream=Stalling(sse((4, "progress", {"tokens": 2})))),
        ok(sse((5, "done", {"finish_reason": "stop"}))),
    )
    client = client_for(server, heartbeat_timeout=0.05)
    watch = client.watch("s")
    async with client:
        ids = [event.id async for event in watch]
    assert ids == [1, 2, 3, 4, 5]
    assert server.resume_points == [None, "2", "2", "3", "4"]
    assert watch.stats.reconnects == 4
    assert watch.stats.heartbeat_timeouts == 1
    assert watch.stats.events == 5
    assert watch.stats.last_event_id == 5


async def test_watch_stops_at_204_and_raises_client_errors_without_retrying() -> None:
    assert await collect(client_for(Server(lambda: httpx.Response(204)))) == []
    for code in (400, 401, 404, 410):
        server = Server(status(code))
        with pytest.raises(APIError) as caught:
            await collect(client_for(server))
        assert (caught.value.status, caught.value.code) == (code, f"c{code}")
        assert len(server.resume_points) == 1


async def test_watch_gives_up_after_its_deadline_with_the_last_reason() -> None:
    server = Server(*[status(503)] * 1000)
    client = client_for(server, backoff=Backoff(initial=0.01, maximum=0.02, give_up_after=0.2))
    with pytest.raises(ConnectionFailed, match="c503"):
        await collect(client)
    assert 3 < len(server.resume_points) < 1000


async def test_calls_report_unreachable_brokers_and_error_bodies() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with AsyncClient("http://broker.test", transport=httpx.MockTransport(refuse)) as sb:
        with pytest.raises(ConnectionFailed, match="cannot reach the broker"):
            await sb.get("x")
    garbage = Server(lambda: httpx.Response(502, content=b"<html>bad gateway</html>"))
    async with client_for(garbage) as sb:
        with pytest.raises(APIError, match="http_502: <html>bad gateway"):
            await sb.get("x")


async def test_watch_gives_up_sooner_on_a_broker_that_never_accepted_it() -> None:
    never = Server(*[status(500)] * 1000)
    backoff = Backoff(initial=0.01, maximum=0.02, give_up_after=30, give_up_unanswered_after=0.2)
    with anyio.fail_after(5), pytest.raises(ConnectionFailed, match="c500"):
        await collect(client_for(never, backoff=backoff))
    # Once a connection was accepted, only give_up_after counts: the same outage is outlived.
    answers = [ok(sse((1, "token", {"text": "a"}))), *[status(503)] * 40]
    answered = Server(*answers, ok(sse((2, "done", {"finish_reason": "stop"}))))
    backoff = Backoff(initial=0.01, maximum=0.02, give_up_after=30, give_up_unanswered_after=0.05)
    with anyio.fail_after(5):
        assert await collect(client_for(answered, backoff=backoff)) == [1, 2]


async def never_answer(request: httpx.Request) -> httpx.Response:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_watch_times_out_a_peer_that_accepts_and_never_answers() -> None:
    backoff = Backoff(initial=0.01, give_up_unanswered_after=0.3)
    transport = httpx.MockTransport(never_answer)
    client = AsyncClient("http://broker.test", transport=transport, timeout=0.1, backoff=backoff)
    with anyio.fail_after(5), pytest.raises(ConnectionFailed, match=r"did not answer in 0\.1s"):
        await collect(client)


async def test_watch_does_not_reconnect_to_an_answer_that_is_no_event_stream() -> None:
    page = Server(lambda: httpx.Response(200, html="<html>\n</html>"))
    with pytest.raises(ClientError, match="text/html, not an event stream"):
        await collect(client_for(page))
    assert len(page.resume_points) == 1


class Cut(httpx.AsyncByteStream):
    """Sends its bytes, then fails as a connection cut mid-body does."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body
        raise httpx.RemoteProtocolError("peer closed connection (incomplete chunked read)")


def archive(last_seq: int, events: int) -> bytes:
    header: dict[str, object] = {
        "format": "streambroker.stream",
        "meta": {"last_seq": str(last_seq)},
    }
    lines: list[dict[str, object]] = [header]
    lines += [{"id": seq, "event": "token", "t": seq, "data": {}} for seq in range(1, events + 1)]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def export(server: Server) -> list[bytes]:
    async with client_for(server) as sb:
        return [line async for line in sb.export("s")]


async def test_export_yields_a_whole_archive_and_raises_on_one_that_ends_short() -> None:
    assert await export(Server(ok(archive(3, 3)))) == archive(3, 3).splitlines(keepends=True)
    assert len(await export(Server(ok(archive(0, 0))))) == 1  # nothing yet after the header
    cut = Server(lambda: httpx.Response(200, stream=Cut(archive(5, 2))))
    with pytest.raises(ConnectionFailed, match="the export of s was cut short after 3 lines"):
        await export(cut)
    with pytest.raises(ClientError, match=r"the export of s ended short of its last event \(5\)"):
        await export(Server(ok(archive(5, 2))))
    with pytest.raises(ClientError, match=r"not an archive: <html>$"):
        await export(Server(ok(b"<html>\n<p>hi</p>\n")))


async def test_answers_that_are_not_json_are_client_errors_in_one_line() -> None:
    async with client_for(Server(ok(b"<html>\n<p>hi</p>\n"))) as sb:
        with pytest.raises(ClientError, match=r"not JSON \(HTTP 200\): <html> <p>hi</p>$"):
            await sb.get("x")
    async with client_for(Server(lambda: httpx.Response(502, content=b"<p>\nbad\n</p>"))) as sb:
        with pytest.raises(APIError, match=r"^http_502: <p> bad </p> \(HTTP 502\)$"):
            await sb.get("x")


def test_the_sync_client_closes_cleanly_after_ctrl_c() -> None:
    stalled = Server(lambda: httpx.Response(200, stream=Stalling(b": hello\n\n")))
    with Client("http://broker.test", transport=httpx.MockTransport(stalled.handle)) as sb:
        watch = sb.watch("s")
        sb._loop.call_later(0.05, os.kill, os.getpid(), signal.SIGINT)  # mid-wait
        with pytest.raises(KeyboardInterrupt):
            next(watch)
        watch.close()
    assert sb._loop.is_closed()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
