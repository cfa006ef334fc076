"""Bad input end to end: bad requests (bodies, ids, methods, paths) answered with a clear
JSON error, and malformed resume points (``Last-Event-ID`` or ``?last_event_id``, sub-event
ids of the OpenAI and AI SDK formats) refused without harm.

Sent to the ``deployment`` fixture's front-ends, whose body limit is ``MAX_BODY_BYTES``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.deployment import MAX_BODY_BYTES, Deployment
from tests.support.generations import MESSAGES, create, expected_text, state
from tests.support.sse import decode_sse, watch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


VALID_ID = "01aaaaaaaaaaaaaaaaaaaaaaaa"
GOOD = {"model": "fake", "messages": MESSAGES}
BAD_INPUTS = [
    # (name, method, path, request kwargs, status, code, text the message must name)
    (
        "not json",
        "POST",
        "/v1/streams",
        {"content": b"{", "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
        "",
    ),
    (
        "empty body",
        "POST",
        "/v1/streams",
        {"content": b"", "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
        "",
    ),
    (
        "wrong content type",
        "POST",
        "/v1/streams",
        {"content": b"model=fake", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
        "",
    ),
    ("array body", "POST", "/v1/streams", {"json": [GOOD]}, 400, "invalid_request", "object"),
    (
        "missing model",
        "POST",
        "/v1/streams",
        {"json": {"messages": MESSAGES}},
        400,
        "invalid_request",
        "model",
    ),
    (
        "model not a string",
        "POST",
        "/v1/streams",
        {"json": {**GOOD, "model": 7}},
        400,
        "invalid_request",
        "model",
    ),
    (
        "missing messages",
        "POST",
        "/v1/streams",
        {"json": {"model": "fake"}},
        400,
        "invalid_request",
        "messages",
    ),
    (
        "messages not a list",
        "POST",
        "/v1/streams",
        {"json": {**GOOD, "messages": "hi"}},
        400,
        "invalid_request",
        "messages",
    ),
    (
        "bad role",
        "POST",
        "/v1/streams",
        {"json": {**GOOD, "messages": [{"role": "robot", "content": "x"}]}},
        400,
        "invalid_request",
        "messages[0].role",
    ),
    (
        "max_tokens not int",
        "POST",
        "/v1/streams",
        {"json": {**GOOD, "max_tokens": "ten"}},
        400,
        "invalid_request",
        "max_tokens",
    ),
    (
        "max_tokens zero",
        "POST",
        "/v1/streams",
        {"json": {**GOOD, "max_tokens": 0}},
        400,
        "invalid_request",
        "max_tokens",
    ),
    (
        "unknown model",
        "POST",
        "/v1/streams",
        {"json": {**GOOD, "model": "no-such-model"}},
        422,
        "unknown_model",
        "no-such-model",
    ),
    (
        "fake options with another model",
        "POST",
        "/v1/streams",
        {"json": {**GOOD, "model": "echo-model", "fake": {"seed": 1}}},
        400,
        "invalid_request",
        "fake",
    ),
    (
        "bad fake rate",
        "POST",
        "/v1/streams",
        {"json": {**GOOD, "fake": {"tokens_per_second": -1}}},
        400,
        "invalid_request",
        "fake.tokens_per_second",
    ),
    (
        "unknown fake option",
        "POST",
        "/v1/streams",
        {"json": {**GOOD, "fake": {"speed": 1}}},
        400,
        "invalid_request",
        "fake.speed",
    ),
    (
        "body too large",
        "POST",
        "/v1/streams",
        {"json": {**GOOD, "metadata": {"k": "x" * 500}, "padding": "y" * MAX_BODY_BYTES}},
        413,
        "body_too_large",
        "",
    ),
    (
        "integer beyond 64 bits",
        "POST",
        "/v1/streams",
        {
            "content": b'{"model": "fake", "messages": [], "seed": 1' + b"0" * 400 + b"}",
            "headers": {"content-type": "application/json"},
        },
        400,
        "invalid_json",
        "64-bit",
    ),
    (
        "non-finite number",
        "POST",
        "/v1/streams",
        {
            "content": b'{"model": "fake", "messages": [], "temperature": 1e999}',
            "headers": {"content-type": "application/json"},
        },
        400,
        "invalid_json",
        "",
    ),
    (
        "lone surrogate",
        "POST",
        "/v1/streams",
        {
            "content": b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}],'
            b' "metadata": {"k": "\\ud800"}}',
            "headers": {"content-type": "application/json"},
        },
        400,
        "invalid_json",
        "surrogate",
    ),
    (
        "fake rate too slow for its length",
        "POST",
        "/v1/streams",
        {"json": {**GOOD, "max_tokens": 1000, "fake": {"tokens_per_second": 0.01}}},
        400,
        "invalid_request",
        "fake.tokens_per_second",
    ),
    ("unknown stream", "GET", f"/v1/streams/{VALID_ID}", {}, 404, "stream_not_found", VALID_ID),
    ("malformed stream id", "GET", "/v1/streams/not-an-id", {}, 404, "stream_not_found", ""),
    (
        "events of unknown stream",
        "GET",
        f"/v1/streams/{VALID_ID}/events",
        {},
        404,
        "stream_not_found",
        "",
    ),
    (
        "cancel unknown stream",
        "POST",
        f"/v1/streams/{VALID_ID}/cancel",
        {},
        404,
        "stream_not_found",
        "",
    ),
    ("wrong method", "DELETE", "/v1/streams", {}, 405, "method_not_allowed", "DELETE"),
    ("unknown path", "GET", "/v1/nothing-here", {}, 404, "not_found", "/v1/nothing-here"),
]
BAD_RESUME_POINTS = [
    ("header", "abc"),
    ("header", "-1"),
    ("header", "1.5"),
    ("header", "0-3"),
    ("query", "x"),
    ("header", "9" * 30),
]


@pytest.mark.parametrize(
    ("name", "method", "path", "kwargs", "status", "code", "names"),
    BAD_INPUTS,
    ids=[row[0] for row in BAD_INPUTS],
)
async def test_bad_input_gets_a_clear_json_error(
    deployment: Deployment,
    client: httpx.AsyncClient,
    name: str,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
    names: str,
) -> None:
    response = await client.request(method, f"{deployment.urls[0]}{path}", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert names in error["message"]


async def test_malformed_resume_points_are_refused_and_harm_nothing(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    stream_id = await create(client, deployment.urls[0], max_tokens=12)
    before = await watch(client, deployment.urls[0], stream_id)
    for via, raw in BAD_RESUME_POINTS:
        url = f"{deployment.urls[1]}/v1/streams/{stream_id}/events"
        if via == "header":
            response = await client.get(url, headers={"Last-Event-ID": raw})
        else:
            response = await client.get(url, params={"last_event_id": raw})
        assert response.status_code == 400, (via, raw, response.text)
        assert response.json()["error"]["code"] == "invalid_last_event_id"
    after = await watch(client, deployment.urls[1], stream_id)
    assert after.events == before.events
    assert (await state(client, deployment.urls[0], stream_id))["text"] == expected_text(12)


BAD_SUB_EVENT_IDS = ["5.", ".1", "5.0", "5.1.2", "5.-1", "5.1000", "5,1", "\u0665.1", "5.\u0661"]


@pytest.mark.parametrize("wire", ["openai", "ai-sdk"])
async def test_formats_with_sub_event_ids_refuse_malformed_ones(
    deployment: Deployment, client: httpx.AsyncClient, wire: str
) -> None:
    """``<id>.<k>`` is accepted where such ids are sent, and nothing looser."""
    stream_id = await create(client, deployment.urls[0], max_tokens=6)
    await watch(client, deployment.urls[0], stream_id)  # until it ended
    url = f"{deployment.urls[1]}/v1/streams/{stream_id}/events"
    for raw in BAD_SUB_EVENT_IDS:
        response = await client.get(url, params={"format": wire, "last_event_id": raw})
        assert response.status_code == 400, (raw, response.text)
        assert response.json()["error"]["code"] == "invalid_last_event_id"
    fine = await client.get(url, params={"format": wire, "last_event_id": "1.1"})
    assert fine.status_code == 200
    assert decode_sse(fine.text)[-1].data == "[DONE]"
    beats = await client.get(url, params={"format": wire, "heartbeat": "event"})
    assert beats.status_code == 400  # a heartbeat event is no chunk: its clients would fail
    native = await client.get(url, headers={"Last-Event-ID": "1.1"})
    assert native.json()["error"]["code"] == "invalid_last_event_id"
    assert native.status_code == 400  # the broker's own format never sends one


async def test_a_blank_last_event_id_header_falls_back_to_the_query(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    """Regression (review 1.4): a blank header shadowed ?last_event_id and replayed all."""
    stream_id = await create(client, deployment.urls[0], max_tokens=10)
    whole = await watch(client, deployment.urls[0], stream_id)
    url = f"{deployment.urls[1]}/v1/streams/{stream_id}/events"
    async with client.stream(
        "GET", url, params={"last_event_id": "3"}, headers={"Last-Event-ID": ""}
    ) as response:
        body = "".join([chunk async for chunk in response.aiter_text()])
    ids = [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")]
    assert ids == [e.id for e in whole.events if e.id > 3]
