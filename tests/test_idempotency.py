"""``Idempotency-Key`` on creates: a create sent again with the same key by the same tenant
answers the generation the first one made, so clients and load balancers may retry creates.

End to end through the ``deployment`` fixture's two api front-ends and worker, plus the
store-level cases a front-end cannot stage: a create that died between its cluster steps
(the job queued, the record never written), completed by the retry.
"""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from broker import jobs, keys
from broker.creation import Idempotency, IdempotencyKeyReused, _queue_command
from broker.generation_log import GenerationLog
from broker.state import GenerationState, Status, new_stream_id, now_ms
from tests.support.deployment import Deployment
from tests.support.generations import MESSAGES, create_request, expected_text
from tests.support.sse import decode_sse, token_text, watch

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def new_key() -> str:
    return str(uuid.uuid4())


async def post(
    client: httpx.AsyncClient, base: str, key: str | None, body: Any, path: str = "/v1/streams"
) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return await client.post(f"{base}{path}", json=body, headers=headers)


async def generations_tagged(client: httpx.AsyncClient, base: str, tag: str) -> list[str]:
    """The ids of the generations whose metadata carries ``tag`` (the listing's filter)."""
    response = await client.get(f"{base}/v1/streams", params={"metadata.tag": tag, "limit": 200})
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["data"]]


@pytest.mark.e2e
async def test_a_create_sent_again_with_its_key_answers_the_first_generation(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    first_api, second_api = deployment.urls
    key, tag = new_key(), new_key()
    body = create_request(max_tokens=12, seed=3, metadata={"tag": tag})
    first = await post(client, first_api, key, body)
    again = await post(client, second_api, key, body)  # another front-end: shared state

    assert first.status_code == 201, first.text
    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.headers["location"] == first.headers["location"]
    assert again.json() == first.json()
    assert await generations_tagged(client, first_api, tag) == [first.json()["id"]]
    watched = await watch(client, second_api, first.json()["id"])
    assert watched.ended
    assert token_text(watched.events) == expected_text(12, seed=3)


@pytest.mark.e2e
async def test_concurrent_creates_with_one_key_make_one_generation(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    key, tag = new_key(), new_key()
    body = create_request(max_tokens=8, metadata={"tag": tag})
    answers: list[httpx.Response] = []

    async def send(base: str) -> None:
        answers.append(await post(client, base, key, body))

    async with anyio.create_task_group() as group:
        for i in range(12):
            group.start_soon(send, deployment.urls[i % 2])

    assert sorted(a.status_code for a in answers) == [200] * 11 + [201], [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert len(await generations_tagged(client, deployment.urls[0], tag)) == 1


@pytest.mark.e2e
async def test_a_key_reused_for_another_request_is_refused_and_changes_nothing(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    base = deployment.urls[0]
    key, tag = new_key(), new_key()
    first = await post(client, base, key, create_request(max_tokens=5, metadata={"tag": tag}))
    other = create_request(max_tokens=6, metadata={"tag": tag})
    refused = await post(client, base, key, other)
    as_chat = await post(
        client,
        base,
        key,
        create_request(max_tokens=5, metadata={"tag": tag}),
        path="/v1/chat/completions",
    )

    assert first.status_code == 201
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "idempotency_key_reused"
    assert first.json()["id"] in refused.json()["error"]["message"]
    # The same body on the other endpoint is another request too.
    assert as_chat.status_code == 422, as_chat.text
    assert await generations_tagged(client, base, tag) == [first.json()["id"]]


@pytest.mark.e2e
async def test_the_same_request_matches_however_its_json_is_ordered_and_the_key_quoted(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    base = deployment.urls[0]
    key = new_key()
    body = create_request(max_tokens=5)
    reordered = dict(reversed(list(body.items())))
    first = await post(client, base, key, body)
    again = await post(client, base, f'"{key}"', reordered)  # the IETF draft's sf-string
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "bad",
    [b"", b"has space", b"x" * 256, "caf\u00e9".encode(), b"tab\there", b'""'],
    ids=["empty", "space", "too-long", "non-ascii", "tab", "empty-quoted"],
)
@pytest.mark.parametrize("path", ["/v1/streams", "/v1/chat/completions"])
async def test_a_malformed_key_is_a_clear_400_and_creates_nothing(
    deployment: Deployment, client: httpx.AsyncClient, bad: bytes, path: str
) -> None:
    base = deployment.urls[0]
    tag = new_key()
    response = await client.post(
        f"{base}{path}",
        json=create_request(max_tokens=3, metadata={"tag": tag}),
        headers={"Idempotency-Key": bad},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_idempotency_key"
    assert await generations_tagged(client, base, tag) == []


@pytest.mark.e2e
async def test_two_keys_on_one_request_are_a_400(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    response = await client.post(
        f"{deployment.urls[0]}/v1/streams",
        json=create_request(max_tokens=3),
        headers=[("Idempotency-Key", new_key()), ("Idempotency-Key", new_key())],
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_idempotency_key"


@pytest.mark.e2e
async def test_the_longest_key_is_taken(deployment: Deployment, client: httpx.AsyncClient) -> None:
    key = "k" * 255
    base = deployment.urls[0]
    first = await post(client, base, key, create_request(max_tokens=3))
    again = await post(client, base, key, create_request(max_tokens=3))
    assert (first.status_code, again.status_code) == (201, 200)


@pytest.mark.e2e
async def test_a_retried_streaming_chat_completion_streams_the_first_answer_in_full(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    base = deployment.urls[0]
    key = new_key()
    body = {**create_request(max_tokens=10, seed=5), "stream": True}

    async def stream_once() -> tuple[httpx.Headers, str]:
        async with client.stream(
            "POST", f"{base}/v1/chat/completions", json=body, headers={"Idempotency-Key": key}
        ) as response:
            assert response.status_code == 200
            return response.headers, (await response.aread()).decode()

    first_headers, first_text = await stream_once()
    again_headers, again_text = await stream_once()
    assert again_headers["x-stream-id"] == first_headers["x-stream-id"]
    assert again_headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first_headers
    # The same frames (heartbeats fall where they fall), through to the end.
    assert decode_sse(again_text) == decode_sse(first_text)
    assert decode_sse(again_text)[-1].data == "[DONE]"


@pytest.mark.e2e
async def test_a_retried_chat_completion_answers_the_first_completion(
    deployment: Deployment, client: httpx.AsyncClient
) -> None:
    base = deployment.urls[1]
    key = new_key()
    body = create_request(max_tokens=10, seed=9)
    first = await post(client, base, key, body, path="/v1/chat/completions")
    again = await post(client, base, key, body, path="/v1/chat/completions")
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.headers["x-stream-id"] == first.headers["x-stream-id"]
    assert again.json()["choices"] == first.json()["choices"]
    assert first.json()["choices"][0]["message"]["content"] == expected_text(10, seed=9)


KEY_A, KEY_B = "tenant-a-key-0123456789", "tenant-b-key-0123456789"


@pytest.mark.e2e
async def test_tenants_do_not_share_keys(launch: Any, client: httpx.AsyncClient) -> None:
    api = launch.api_and_worker(
        {
            "BROKER_API_KEYS": f"{KEY_A}:tenant-a,{KEY_B}:tenant-b",
            "BROKER_READ_TOKEN_SECRETS": "s" * 32,
        }
    )
    key = new_key()
    body = create_request(max_tokens=3)
    answers = [
        await client.post(
            f"{api.url}/v1/streams",
            json=body,
            headers={"Idempotency-Key": key, "Authorization": f"Bearer {api_key}"},
        )
        for api_key in (KEY_A, KEY_B, KEY_A)
    ]
    assert [a.status_code for a in answers] == [201, 201, 200]
    a_first, b_first, a_again = (a.json()["id"] for a in answers)
    assert a_first != b_first
    assert a_again == a_first


# -- the store: what a front-end cannot stage ----------------------------------------------


@pytest.fixture
def store_log(redis: aioredis.Redis) -> GenerationLog:
    return GenerationLog(redis, retention_seconds=600)


def new_state() -> GenerationState:
    return GenerationState(
        id=new_stream_id(),
        model="fake",
        status=Status.QUEUED,
        created_at_ms=now_ms(),
        request={"model": "fake", "messages": MESSAGES},
    )


def idempotency(key: str = "k-1", fingerprint: str = "f-1") -> Idempotency:
    return Idempotency(keys.idempotency_key("", key), fingerprint)


async def test_a_create_that_died_between_its_cluster_steps_is_completed_by_its_retry(
    store_log: GenerationLog, redis: aioredis.Redis
) -> None:
    """The first create ran its control-slot step (the key claimed, the job queued) and died
    before writing the record, as a cluster create can: the retry writes that record, with
    the first create's id and creation time, and queues no second job."""
    first, retry = new_state(), new_state()
    claim = idempotency()
    assert await redis.eval(*_queue_command(store_log, first, claim, claim.value(first))) is None

    created = await store_log.create(retry, claim)

    assert created.replayed
    assert (created.state.id, created.state.created_at_ms) == (first.id, first.created_at_ms)
    stored = await store_log.get(first.id)
    assert (stored.status, stored.created_at_ms) == (Status.QUEUED, first.created_at_ms)
    assert await redis.exists(keys.meta_key(retry.id)) == 0
    assert await redis.zrange(keys.QUEUE_NAME, 0, -1) == [keys.job_id(first.id).encode()]
    assert await redis.exists(jobs.job_record_key(first.id)) == 1


async def test_a_retry_never_writes_over_a_generation_that_started(
    store_log: GenerationLog, redis: aioredis.Redis
) -> None:
    first = new_state()
    claim = idempotency()
    await store_log.create(first, claim)
    await store_log.claim(first.id, worker="w", lease_seconds=5)

    again = await store_log.create(new_state(), claim)

    assert again.replayed
    assert again.state.id == first.id
    assert (await store_log.get(first.id)).status == Status.RUNNING
    assert await redis.zcard(keys.INDEX_KEY) == 1


async def test_a_reused_key_raises_and_leaves_no_trace_of_the_second_request(
    store_log: GenerationLog, redis: aioredis.Redis
) -> None:
    first, second = new_state(), new_state()
    await store_log.create(first, idempotency(fingerprint="one"))
    with pytest.raises(IdempotencyKeyReused) as refused:
        await store_log.create(second, idempotency(fingerprint="two"))
    assert refused.value.stream_id == first.id
    assert await redis.exists(keys.meta_key(second.id)) == 0
    assert await redis.zrange(keys.INDEX_KEY, 0, -1) == [first.id.encode()]
    assert await redis.zcard(keys.QUEUE_NAME) == 1


async def test_the_key_lives_a_day_or_the_retention_when_shorter(
    redis: aioredis.Redis,
) -> None:
    day_log = GenerationLog(redis, retention_seconds=7 * 86400)
    short_log = GenerationLog(redis, retention_seconds=600)
    await day_log.create(new_state(), idempotency("long"))
    await short_log.create(new_state(), idempotency("short"))
    assert 86400 - 5 <= await redis.ttl(keys.idempotency_key("", "long")) <= 86400
    assert 600 - 5 <= await redis.ttl(keys.idempotency_key("", "short")) <= 600


async def test_creates_without_a_key_are_unchanged(
    store_log: GenerationLog, redis: aioredis.Redis
) -> None:
    states = [new_state(), new_state()]
    for state in states:
        assert not (await store_log.create(state)).replayed
    assert await redis.zcard(keys.INDEX_KEY) == 2
    assert await redis.zcard(keys.QUEUE_NAME) == 2
    assert await redis.zcard(keys.LEASES_KEY) == 2
    assert await redis.keys(f"{keys.CONTROL}:idem:*") == []
