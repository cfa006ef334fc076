"""Failures inside the api that real processes cannot easily be made to have: the app runs
in-process (Starlette's TestClient runs its lifespan) against the real test redis-server."""

from __future__ import annotations

import pytest

from tests.support.processes import Launcher
from tests.support.redis_server import free_port

pytestmark = pytest.mark.redis

BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_readyz_answers_503_in_the_error_shape_when_redis_is_unreachable(
    launch: Launcher,
) -> None:
    client = launch.app(redis_url=f"redis://127.0.0.1:{free_port()}")
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    created = client.post("/v1/streams", json=BODY)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "store_unavailable"
    assert created.status_code == 503
    assert created.json()["error"]["code"] == "store_unavailable"


def test_oversized_request_headers_answer_431_before_any_route_runs(launch: Launcher) -> None:
    client = launch.app(
        {"BROKER_MAX_HEADER_BYTES": "2048"}, redis_url=f"redis://127.0.0.1:{free_port()}"
    )
    fits = client.get("/healthz", headers={"X-Padding": "a" * 1500})
    too_big = client.post("/v1/streams", headers={"X-Padding": "a" * 2100}, json=BODY)
    many = client.get("/healthz", headers={f"X-H{i}": "v" * 60 for i in range(40)})
    assert fits.status_code == 200
    for response in (too_big, many):
        assert response.status_code == 431
        assert response.json()["error"]["code"] == "headers_too_large"
