"""API keys, tenants and read tokens, through the real app (in-process, Starlette's
TestClient runs its lifespan) on the session's redis-server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from starlette.testclient import TestClient

from broker import read_token_signing
from broker.errors import ConfigError
from broker.settings import Settings
from tests.support.generations import bearer, create_stream, finish_as_a_worker
from tests.support.processes import Launcher
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

KEY_A = "key-of-tenant-a-0123456789"
KEY_B = "key-of-tenant-b-0123456789"
SECRET = "s" * 32
BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


AUTH_ENV = {
    "BROKER_API_KEYS": f"{KEY_A}:tenant-a,{KEY_B}:tenant-b",
    "BROKER_READ_TOKEN_SECRETS": SECRET,
}


@pytest.fixture
def client(launch: Launcher) -> TestClient:
    return launch.app(AUTH_ENV)


def event_types(client: TestClient, url: str, **kwargs: Any) -> list[str]:
    with client.stream("GET", url, **kwargs) as response:
        assert response.status_code == 200, response.read()
        body = response.read().decode()
    return [line[len("event: ") :] for line in body.splitlines() if line.startswith("event: ")]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/streams"),
        ("GET", "/v1/streams/01m7zg35f6ys8701yg1hhg2w5d"),
        ("GET", "/v1/streams/01m7zg35f6ys8701yg1hhg2w5d/events"),
        ("POST", "/v1/streams/01m7zg35f6ys8701yg1hhg2w5d/cancel"),
        ("GET", "/v1/models"),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("not-a-key-of-anyone-at-all"),
        {"Authorization": KEY_A},
        {"Authorization": "Bearer "},
    ],
)
def test_every_v1_route_needs_a_known_key(
    client: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = client.request(method, path, headers=headers, json=BODY)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert KEY_A not in response.text


def test_health_stays_open(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200


def test_a_tenant_never_sees_reads_or_cancels_another_tenants_stream(
    client: TestClient, redis_server: RedisServer
) -> None:
    stream_id = create_stream(client, key=KEY_A)["id"]
    finish_as_a_worker(redis_server.url, stream_id, "secret answer")
    for method, path in [
        ("GET", f"/v1/streams/{stream_id}"),
        ("GET", f"/v1/streams/{stream_id}/events"),
        ("POST", f"/v1/streams/{stream_id}/cancel"),
    ]:
        other = client.request(method, path, headers=bearer(KEY_B))
        missing = client.request(
            method, path.replace(stream_id, "01m7zg35f6ys8701yg1hhg2w5d"), headers=bearer(KEY_B)
        )
        assert other.status_code == missing.status_code == 404  # indistinguishable
        assert other.json()["error"]["code"] == "stream_not_found"
        assert "secret answer" not in other.text
    own = client.get(f"/v1/streams/{stream_id}", headers=bearer(KEY_A))
    assert own.status_code == 200
    assert own.json()["text"] == "secret answer"


def test_a_cancel_by_another_tenant_changes_nothing(client: TestClient) -> None:
    stream_id = create_stream(client, key=KEY_A)["id"]
    client.post(f"/v1/streams/{stream_id}/cancel", headers=bearer(KEY_B))
    state = client.get(f"/v1/streams/{stream_id}", headers=bearer(KEY_A)).json()
    assert state["status"] == "queued"


def test_a_read_token_reads_its_one_stream_without_a_key(
    client: TestClient, redis_server: RedisServer
) -> None:
    created = create_stream(client, key=KEY_A)
    stream_id, token = created["id"], created["read_token"]
    finish_as_a_worker(redis_server.url, stream_id, "shared")
    state = client.get(f"/v1/streams/{stream_id}", params={"token": token})
    assert state.status_code == 200
    assert state.json()["text"] == "shared"
    types = event_types(client, f"/v1/streams/{stream_id}/events", params={"token": token})
    assert types == ["metadata", "token", "done"]
    # Not another stream, and not to cancel or create.
    other = create_stream(client, key=KEY_A)["id"]
    assert client.get(f"/v1/streams/{other}", params={"token": token}).status_code == 404
    cancel = client.post(f"/v1/streams/{stream_id}/cancel", params={"token": token})
    assert cancel.status_code == 401
    assert client.post("/v1/streams", json=BODY, params={"token": token}).status_code == 401


def test_bad_read_tokens_answer_401_invalid_token(client: TestClient) -> None:
    stream_id = create_stream(client, key=KEY_A)["id"]
    expired = read_token_signing.issue([SECRET], stream_id, now=time.time() - 7200, ttl_seconds=60)
    forged = read_token_signing.issue(["f" * 32], stream_id, now=time.time(), ttl_seconds=60)
    for token in (expired, forged, "garbage", f"{stream_id}.9.{'0' * 32}"):
        response = client.get(f"/v1/streams/{stream_id}", params={"token": token})
        assert response.status_code == 401, token
        assert response.json()["error"]["code"] == "invalid_token"


def test_a_rotated_secret_keeps_old_tokens_valid(launch: Launcher) -> None:
    created = create_stream(launch.app(AUTH_ENV), key=KEY_A)
    after = launch.app({**AUTH_ENV, "BROKER_READ_TOKEN_SECRETS": f"{'n' * 32},{SECRET}"})
    url = f"/v1/streams/{created['id']}"
    assert after.get(url, params={"token": created["read_token"]}).status_code == 200
    fresh = create_stream(after, key=KEY_A)["read_token"]
    assert read_token_signing.verify(["n" * 32], fresh, now=time.time())  # signed by the new one


def test_without_keys_nothing_is_asked_and_no_token_is_issued(launch: Launcher) -> None:
    response = launch.app().post("/v1/streams", json=BODY)
    assert response.status_code == 201
    assert "read_token" not in response.json()


def test_keys_without_a_token_secret_stop_start_up(redis_server: RedisServer) -> None:
    with pytest.raises(ConfigError, match="BROKER_READ_TOKEN_SECRETS"):
        Settings.from_env({"REDIS_URL": redis_server.url, "BROKER_API_KEYS": f"{KEY_A}:tenant-a"})


@pytest.mark.parametrize(
    "raw", [f"{KEY_A}", f"{KEY_A}:", "short:tenant", f"{KEY_A}:a,{KEY_A}:b", ","]
)
def test_malformed_keys_stop_start_up_without_showing_them(raw: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"BROKER_API_KEYS": raw})
    assert "BROKER_API_KEYS" in str(refused.value)
    assert KEY_A not in str(refused.value)
    assert "short" not in str(refused.value)


def test_state_records_the_tenant(client: TestClient, redis_server: RedisServer) -> None:
    stream_id = create_stream(client, key=KEY_B)["id"]

    async def tenant() -> bytes | None:
        store = aioredis.Redis.from_url(redis_server.url)
        value: bytes | None = await store.hget(f"sb:{{{stream_id}}}:meta", "tenant")
        await store.aclose()
        return value

    assert asyncio.run(tenant()) == b"tenant-b"
