"""The OpenAI transcoding without processes: chunk shapes, frame splitting across reads,
pings the openai SDK tolerates, and stream:false folding (tool calls, errors)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from api.openai_format import Completion, OpenAIChunks, error_body, transcode

pytestmark = pytest.mark.anyio

BROKER_WIRE = (
    b"retry: 2000\n\n"
    b'id: 1\nevent: metadata\ndata: {"model":"m","t":1}\n\n'
    b": ping\n\n"
    b'id: 2\nevent: token\ndata: {"text":"Hi","tokens":1,"t":2}\n\n'
    b'id: 3\nevent: progress\ndata: {"tokens":1,"t":3}\n\n'
    b'id: 4\nevent: tool_call\ndata: {"index":0,"id":"c1","name":"f","arguments":"{\\"a","t":4}\n\n'
    b'id: 5\nevent: tool_call\ndata: {"index":0,"arguments":"\\":1}","t":5}\n\n'
    b'id: 6\nevent: done\ndata: {"finish_reason":"cancelled","usage":{"completion_tokens":2},'
    b'"t":6}\n\n'
)


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def transcoded(size: int, include_usage: bool = True) -> bytes:
    chunks = OpenAIChunks("s1", "m", 100, include_usage=include_usage)
    return b"".join([frame async for frame in transcode(pieces(BROKER_WIRE, size), chunks)])


async def test_transcoding_is_the_same_whatever_the_reads() -> None:
    whole = await transcoded(len(BROKER_WIRE))
    for size in (1, 7, 64):
        assert await transcoded(size) == whole


async def test_frames_carry_ids_and_openai_chunks_and_no_retry() -> None:
    wire = (await transcoded(len(BROKER_WIRE))).decode()
    assert "retry:" not in wire
    assert ": ping\nid: 2\n" in wire  # a comment without the blank line that would dispatch
    frames = [f for f in wire.split("\n\n") if f]
    datas = [f.split("data: ", 1)[1] for f in frames]
    ids = [f.split("\n")[-2 if f.startswith(":") else 0] for f in frames]
    assert ids == ["id: 1", "id: 2", "id: 4", "id: 5", "id: 6", "id: 6", "id: 6"]
    chunks = [json.loads(d) for d in datas[:-1]]
    assert datas[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert chunks[2]["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a'}}
    ]
    assert chunks[3]["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "function": {"arguments": '":1}'}}
    ]
    assert chunks[4]["choices"][0]["finish_reason"] == "stop"  # cancelled, in OpenAI's words
    assert chunks[5]["choices"] == []
    assert chunks[5]["usage"] == {"completion_tokens": 2}
    assert {c["id"] for c in chunks} == {"chatcmpl-s1"}
    without_usage = (await transcoded(len(BROKER_WIRE), include_usage=False)).decode()
    assert '"usage"' not in without_usage


def test_completion_folds_text_tool_calls_and_errors() -> None:
    completion = Completion("s1", "m", 100)
    for event, data in [
        ("metadata", {}),
        ("tool_call", {"index": 1, "id": "c2", "name": "g", "arguments": "{"}),
        ("tool_call", {"index": 0, "id": "c1", "name": "f", "arguments": "{}"}),
        ("tool_call", {"index": 1, "arguments": "}"}),
        ("done", {"finish_reason": "tool_calls", "usage": {"total_tokens": 3}}),
    ]:
        completion.add(event, data)
    body = completion.body()
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"])
            for c in message["tool_calls"]] == [("c1", "f", "{}"), ("c2", "g", "{}")]  # fmt: skip
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"] == {"total_tokens": 3}
    failed = Completion("s2", "m", 100)
    failed.add("token", {"text": "a"})
    failed.add("error", {"code": "x", "message": "m", "retryable": True})
    assert failed.error == {"code": "x", "message": "m", "retryable": True}


def test_error_bodies_have_openai_types_and_the_broker_code() -> None:
    assert error_body(401, "unauthorized", "no")["error"] == {
        "message": "no",
        "type": "authentication_error",
        "param": None,
        "code": "unauthorized",
    }
    assert error_body(503, "store_unavailable", "x")["error"]["type"] == "server_error"
    assert error_body(429, "too_many", "x")["error"]["type"] == "rate_limit_error"
