"""EventStreamResponse's lifecycle: frozen clients are cut off, hung-up clients stop all work.

Regression tests named after the sse-starlette bugs not to repeat: work continuing after a
disconnect (#39), a frozen client holding its task forever (#89)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from api.sse import EventStreamResponse

pytestmark = pytest.mark.anyio

SCOPE: dict[str, Any] = {"type": "http", "asgi": {"spec_version": "2.4"}}


class Frames:
    """An endless body that records whether it was closed (its cleanup ran)."""

    def __init__(self) -> None:
        self.closed = False
        self.produced = 0
        self.idle = asyncio.Event()

    async def endless(self) -> AsyncIterator[bytes]:
        try:
            while True:
                self.produced += 1
                yield b"data: x\n\n"
        finally:
            self.closed = True

    async def silent(self) -> AsyncIterator[bytes]:
        try:
            yield b"retry: 1000\n\n"
            self.idle.set()
            await asyncio.Event().wait()  # a stream with nothing to send for now
            yield b""
        finally:
            self.closed = True


async def never() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_regression_89_a_frozen_client_is_cut_off_after_the_send_timeout() -> None:
    frames = Frames()
    accepted: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        accepted.append(message)
        if len(accepted) > 3:
            await asyncio.Event().wait()  # its socket buffer is full: nothing is accepted

    response = EventStreamResponse(frames.endless(), send_timeout=0.2)
    with anyio.fail_after(5):
        await response(SCOPE, never, send)  # type: ignore[arg-type]
    assert frames.closed
    assert len(accepted) == 4


async def test_regression_39_a_client_that_hangs_up_while_idle_stops_all_work() -> None:
    frames = Frames()
    hung_up = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await hung_up.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        return None

    response = EventStreamResponse(frames.silent(), send_timeout=5)
    task = asyncio.create_task(response(SCOPE, receive, send))  # type: ignore[arg-type]
    with anyio.fail_after(5):
        await frames.idle.wait()
        hung_up.set()
        await task
    assert frames.closed
