"""The Python client's creates are sent with an ``Idempotency-Key`` and sent again when their
answer is lost, or a front-end could not take them: one generation however often."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from broker.client import APIError, AsyncClient, Backoff, Client
from tests.support.chaos_proxy import ChaosProxy
from tests.support.generations import MESSAGES
from tests.support.processes import ApiProcess, Launcher
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.anyio

QUICK = Backoff(initial=0.01, maximum=0.05)


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    with Launcher(redis_server.url) as launch:
        yield launch.api_and_worker()


def tagged(api: ApiProcess, tag: str) -> list[str]:
    page = httpx.get(f"{api.url}/v1/streams", params={"metadata.tag": tag}, timeout=10)
    return [item["id"] for item in page.json()["data"]]


@pytest.mark.redis
@pytest.mark.e2e
async def test_a_create_whose_answer_was_cut_is_sent_again_and_answered_by_its_generation(
    api: ApiProcess,
) -> None:
    tag = str(uuid.uuid4())
    # The first connection is cut a few bytes into the answer: the create was made, its
    # answer lost. The second passes whole.
    async with (
        ChaosProxy(api.port, cut_after=(1, 40), cut_connections=1) as proxy,
        AsyncClient(f"http://127.0.0.1:{proxy.port}", backoff=QUICK) as sb,
    ):
        created = await sb.create("fake", MESSAGES, max_tokens=5, metadata={"tag": tag})
    assert proxy.cuts == 1
    assert created.replayed
    assert tagged(api, tag) == [created.id]


@pytest.mark.redis
@pytest.mark.e2e
def test_the_sync_client_sends_its_own_key_and_a_repeat_answers_the_same_generation(
    api: ApiProcess,
) -> None:
    key, tag = str(uuid.uuid4()), str(uuid.uuid4())
    with Client(api.url) as sb:
        first = sb.create(
            "fake", MESSAGES, max_tokens=5, metadata={"tag": tag}, idempotency_key=key
        )
        again = sb.create(
            "fake", MESSAGES, max_tokens=5, metadata={"tag": tag}, idempotency_key=key
        )
    assert (first.replayed, again.replayed) == (False, True)
    assert again.id == first.id
    assert tagged(api, tag) == [first.id]


def answering(*statuses: int) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A transport that answers each create with the next status, and records them."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        status = statuses[len(seen) - 1]
        if status >= 400:
            return httpx.Response(status, json={"error": {"code": "x", "message": "no"}})
        body = {"id": "s1", "status": "queued", "url": "/v1/streams/s1", "events_url": "/e"}
        return httpx.Response(status, json=body)

    return httpx.MockTransport(handle), seen


async def test_a_front_end_that_could_not_take_the_create_gets_it_again_with_the_same_key() -> None:
    transport, seen = answering(502, 503, 504, 201)
    async with AsyncClient("http://broker", transport=transport, backoff=QUICK) as sb:
        created = await sb.create("fake", MESSAGES)
    assert created.id == "s1"
    assert len(seen) == 4
    assert len({request.headers["idempotency-key"] for request in seen}) == 1


@pytest.mark.parametrize("status", [400, 401, 422, 429, 500])
async def test_an_error_of_the_request_itself_is_not_sent_again(status: int) -> None:
    transport, seen = answering(status, 201)
    async with AsyncClient("http://broker", transport=transport, backoff=QUICK) as sb:
        with pytest.raises(APIError) as failed:
            await sb.create("fake", MESSAGES)
    assert failed.value.status == status
    assert len(seen) == 1


async def test_retries_end_after_create_retries_with_the_last_error() -> None:
    transport, seen = answering(503, 503, 503, 503, 201)
    async with AsyncClient("http://broker", transport=transport, backoff=QUICK) as sb:
        with pytest.raises(APIError) as failed:
            await sb.create("fake", MESSAGES)
    assert failed.value.status == 503
    assert len(seen) == 4  # the first send and CREATE_RETRIES (3) more
