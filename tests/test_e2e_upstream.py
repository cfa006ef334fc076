"""Generations of the OpenAI-compatible upstream's models end to end: streamed through the
worker; its refusals, and its trouble mid-stream, ending with a stable error code (retried
only before any token); a recovery after one failure; the model listing.

The upstream is the ``deployment`` fixture's ``OpenAIServer``, whose model names script its
answers (``tests/support/openai_server.py``); the worker's upstream timeout is 1.5 s."""

from __future__ import annotations

import httpx
import pytest

from tests.support.deployment import Deployment
from tests.support.generations import MESSAGES, assert_well_formed
from tests.support.openai_answers import echo_text
from tests.support.sse import token_text, watch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


async def test_models_lists_the_fake_and_the_upstream_models(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    response = await client.get(f"{deployment.urls[0]}/v1/models")
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    providers = {m["id"]: m["provider"] for m in listing["data"]}
    assert providers["fake"] == "fake"
    assert providers["echo-model"] == "openai"
    assert "no-such-model" not in providers


async def test_openai_upstream_streams_through_the_worker(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    response = await client.post(
        f"{deployment.urls[0]}/v1/streams",
        json={"model": "echo-model", "messages": MESSAGES, "max_tokens": 6, "temperature": 0.5},
    )
    assert response.status_code == 201, response.text
    stream_id = response.json()["id"]
    seen = await watch(client, deployment.urls[1], stream_id)
    assert_well_formed(seen.events)
    assert token_text(seen.events) == echo_text(6)
    assert seen.events[-1].data["usage"]["completion_tokens"] == 6
    assert deployment.upstream.last_body is not None
    assert deployment.upstream.last_body["temperature"] == 0.5


async def test_openai_upstream_errors_end_with_a_stable_code(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    response = await client.post(
        f"{deployment.urls[0]}/v1/streams", json={"model": "error-401", "messages": MESSAGES}
    )
    assert response.status_code == 201, response.text
    seen = await watch(client, deployment.urls[0], response.json()["id"])
    assert seen.events[-1].type == "error"
    assert seen.events[-1].data["code"] == "upstream_auth"
    assert seen.events[-1].data["retryable"] is False


@pytest.mark.parametrize(
    ("model", "code", "retryable", "text_kept"),
    [
        # Refused before any token: the SDK retried (bounded), then the error is final.
        # (429 is the same path, but its Retry-After of 7 s makes it slow: it is covered in
        # test_openai_provider.py.)
        ("error-500", "upstream_unavailable", True, ""),
        ("error-503", "upstream_unavailable", True, ""),
        ("slow", "upstream_timeout", True, ""),
        # Trouble after tokens were appended: no retry (it could contradict them); the text
        # so far stays, and the end says what happened.
        ("cut-mid-stream", "upstream_connection", True, "alpha bravo charlie"),
        ("malformed-chunk", "upstream_malformed", False, "alpha bravo"),
        ("stream-error", "upstream_error", True, "alpha bravo"),
    ],
)
async def test_provider_trouble_ends_with_the_right_error_and_keeps_what_was_sent(
    deployment: Deployment,
    client: httpx.AsyncClient,
    model: str,
    code: str,
    retryable: bool,
    text_kept: str,
) -> None:
    before = deployment.upstream.requests.get(model, 0)
    response = await client.post(
        f"{deployment.urls[0]}/v1/streams", json={"model": model, "messages": MESSAGES}
    )
    assert response.status_code == 201, response.text
    seen = await watch(client, deployment.urls[1], response.json()["id"])
    assert_well_formed(seen.events)
    end = seen.events[-1]
    assert (end.type, end.data["code"], end.data["retryable"]) == ("error", code, retryable)
    assert token_text(seen.events) == text_kept
    tries = deployment.upstream.requests[model] - before
    if text_kept:
        assert tries == 1  # never retried once a token could have been sent
    else:
        assert tries == 3  # the first try and BROKER_UPSTREAM_MAX_RETRIES (2) retries


async def test_an_upstream_that_fails_once_then_recovers_streams_normally(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    deployment.upstream.reset()
    response = await client.post(
        f"{deployment.urls[0]}/v1/streams",
        json={"model": "flaky-503", "messages": MESSAGES, "max_tokens": 5},
    )
    seen = await watch(client, deployment.urls[0], response.json()["id"])
    assert seen.events[-1].type == "done"
    assert token_text(seen.events) == echo_text(5)
