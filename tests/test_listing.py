"""``GET /v1/streams``: newest first, cursor pages that stay exact while streams are created,
filters, per-tenant lists; and the state's timing and viewer figures. The real app runs
in-process on the session's redis-server; generations are written as a worker would."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from starlette.testclient import TestClient

from broker import keys
from broker.generation_log import RECORD_PENDING_MS
from tests.support.generations import bearer, create_stream, finish_as_a_worker
from tests.support.processes import Launcher
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

KEY_A = "key-of-tenant-a-0123456789"
KEY_B = "key-of-tenant-b-0123456789"


@pytest.fixture
def client(launch: Launcher) -> TestClient:
    """Auth off, on an empty store."""
    return launch.app(flush=True)


def page(client: TestClient, **params: Any) -> dict[str, Any]:
    response = client.get("/v1/streams", params=params)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_pages_are_newest_first_and_exact_while_streams_are_created(client: TestClient) -> None:
    before = [create_stream(client)["id"] for _ in range(23)]
    seen: list[str] = []
    created_meanwhile: list[str] = []
    cursor = None
    while True:
        params = {"limit": 5, **({"cursor": cursor} if cursor else {})}
        result = page(client, **params)
        assert "text" not in (result["data"] or [{}])[0]
        seen += [s["id"] for s in result["data"]]
        created_meanwhile.append(create_stream(client)["id"])  # newer than every cursor
        cursor = result["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(before))  # each once, newest first, none of the new ones
    first = page(client, limit=10)["data"]
    assert [s["id"] for s in first][:5] == list(reversed(created_meanwhile))[:5]


def test_filters_status_model_metadata_and_time(
    client: TestClient, redis_server: RedisServer
) -> None:
    done = create_stream(client, metadata={"session": "s-1", "user": "ann"})["id"]
    finish_as_a_worker(redis_server.url, done, "xxxx", tokens=4)
    queued = create_stream(client, metadata={"session": "s-1", "user": "bob"})["id"]
    other = create_stream(client, metadata={"session": "s-2"})["id"]

    def ids(**params: Any) -> list[str]:
        return [s["id"] for s in page(client, **params)["data"]]

    assert ids(status="completed") == [done]
    assert ids(status="queued") == [other, queued]
    assert ids(model="fake") == [other, queued, done]
    assert ids(model="gpt-none") == []
    assert ids(**{"metadata.session": "s-1"}) == [queued, done]
    assert ids(**{"metadata.session": "s-1", "metadata.user": "bob"}) == [queued]
    state = page(client)["data"][-1]
    created = state["created_at"]
    assert ids(created_before=created) == []
    assert done in ids(created_after=created)


@pytest.mark.parametrize(
    ("params", "code", "names"),
    [
        ({"limit": "0"}, "invalid_request", "limit"),
        ({"limit": "201"}, "invalid_request", "limit"),
        ({"limit": "ten"}, "invalid_request", "limit"),
        ({"status": "sleeping"}, "invalid_request", "status"),
        ({"cursor": "not-a-cursor"}, "invalid_cursor", "cursor"),
        # Regression (the Unicode digits 500): str.isdigit() passed them, int() raised.
        ({"limit": "²"}, "invalid_request", "limit"),
        ({"cursor": "².x"}, "invalid_cursor", "cursor"),
        ({"limit": "\uff15"}, "invalid_request", "limit"),  # FULLWIDTH DIGIT FIVE: int() read it
        ({"created_after": "yesterday"}, "invalid_request", "created_after"),
        ({"created_before": "2026-11-21T10:00:00"}, "invalid_request", "created_before"),
        ({"colour": "red"}, "invalid_request", "colour"),
    ],
)
def test_bad_listing_parameters_are_named(
    client: TestClient, params: dict[str, str], code: str, names: str
) -> None:
    response = client.get("/v1/streams", params=params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"].startswith(names)


def test_expired_generations_leave_the_listing_and_the_index(
    client: TestClient, redis_server: RedisServer
) -> None:
    kept, expired, pending = (create_stream(client)["id"] for _ in range(3))

    async def expire() -> int:
        store = aioredis.Redis.from_url(redis_server.url)
        await store.delete(*keys.generation_keys(expired), *keys.generation_keys(pending))
        # Expired: created longer ago than a record may take to follow its index entry.
        created = await store.zscore(keys.INDEX_KEY, expired)
        assert created is not None
        await store.zadd(keys.INDEX_KEY, {expired: created - RECORD_PENDING_MS - 1})
        await store.aclose()
        return 0

    asyncio.run(expire())
    assert [s["id"] for s in page(client)["data"]] == [kept]

    async def indexed() -> list[bytes]:
        store = aioredis.Redis.from_url(redis_server.url)
        members: list[bytes] = await store.zrange(keys.INDEX_KEY, 0, -1)
        await store.aclose()
        return members

    # The one just created keeps its entry: on a cluster its record may be on its way.
    assert sorted(asyncio.run(indexed())) == sorted([kept.encode(), pending.encode()])


def test_each_tenant_lists_only_its_own(launch: Launcher) -> None:
    client = launch.app(
        {
            "BROKER_API_KEYS": f"{KEY_A}:tenant-a,{KEY_B}:tenant-b",
            "BROKER_READ_TOKEN_SECRETS": "s" * 32,
        },
        flush=True,
    )
    mine = [create_stream(client, key=KEY_A)["id"] for _ in range(3)]
    theirs = create_stream(client, key=KEY_B)["id"]
    listed_a = client.get("/v1/streams", headers=bearer(KEY_A)).json()["data"]
    listed_b = client.get("/v1/streams", headers=bearer(KEY_B)).json()["data"]
    assert client.get("/v1/streams").status_code == 401
    assert [s["id"] for s in listed_a] == list(reversed(mine))
    assert [s["id"] for s in listed_b] == [theirs]


def test_state_reports_timings_viewers_and_resumes(
    client: TestClient, redis_server: RedisServer
) -> None:
    stream_id = create_stream(client)["id"]
    finish_as_a_worker(redis_server.url, stream_id, "x" * 8, tokens=8)
    url = f"/v1/streams/{stream_id}/events"
    for headers in ({}, {}, {"Last-Event-ID": "1"}):
        with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            response.read()
    assert client.get(url, headers={"Last-Event-ID": "3"}).status_code == 204
    state = client.get(f"/v1/streams/{stream_id}").json()
    assert state["connections"] == 4
    assert state["resumes"] == 2
    assert state["duration_ms"] is not None
    assert state["duration_ms"] >= 0
    assert state["time_to_first_token_ms"] is not None
    listed = page(client)["data"][0]
    assert listed["connections"] == 4
