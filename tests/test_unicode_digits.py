"""Regression (the Unicode digits 500): every number a request carries — ``?limit``,
``?cursor``, a read token's expiry, ``Last-Event-ID`` and ``?last_event_id``,
``Content-Length``, ``?replay`` — is read as ASCII digits only (``broker.numbers``).

``str.isdigit`` let superscripts through (``?limit=²``) and ``int()`` then raised: a 500, and
for a read token before its signature was checked, so no key was needed. ``int()`` and
``float()`` also took other scripts' digits (Arabic-Indic, full-width), ``_``, signs and
spaces. Each is refused here with the JSON error shape: 400, or 401 ``invalid_token``. The
real app runs in-process on the session's redis-server, with auth on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.support.generations import bearer, create_stream
from tests.support.processes import Launcher
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

KEY = "key-of-the-digits-tenant-0123"
AUTH = bearer(KEY)

#: What int(), float() or str.isdigit() take and a request must not: a superscript two
#: (isdigit, then int() raises), ARABIC-INDIC DIGIT ONE and FULLWIDTH DIGIT ONE (int() reads
#: them), '_', a sign and a space (int() and float() skip them).
NOT_ASCII_DECIMAL = ["²", "\u0661", "\uff11", "1_0", "+1", " 1"]
#: The same, as a header can carry them: latin-1 only (Starlette decodes headers as latin-1),
#: and without surrounding blanks, which HTTP strips from a header value.
NOT_ASCII_DECIMAL_HEADERS = ["²", "¹", "1_0", "+1", "1 1"]


@pytest.fixture(scope="module")
def client(redis_server: RedisServer) -> Iterator[TestClient]:
    env = {"BROKER_API_KEYS": f"{KEY}:digits", "BROKER_READ_TOKEN_SECRETS": "d" * 32}
    with Launcher(redis_server.url) as launch:
        yield launch.app(env, flush=True, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def stream(client: TestClient) -> dict[str, Any]:
    """A queued stream (no worker runs): an accepted resume point would stream forever, so
    event requests are only read when refused."""
    return create_stream(client, key=KEY, max_tokens=2)


def assert_refused(response: Any, status: int, code: str, names: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str)
    if names is not None:
        assert error["message"].startswith(names), error["message"]


def get_events(client: TestClient, url: str, **kwargs: Any) -> Any:
    with client.stream("GET", url, **kwargs) as response:
        assert response.status_code != 200, "accepted: the stream was opened"
        response.read()
    return response


def header_bytes(raw: str) -> bytes:
    return raw.encode("latin-1")


@pytest.mark.parametrize("raw", NOT_ASCII_DECIMAL)
def test_a_listing_limit_in_unicode_digits_is_a_400_not_a_500(client: TestClient, raw: str) -> None:
    response = client.get("/v1/streams", params={"limit": raw}, headers=AUTH)
    assert_refused(response, 400, "invalid_request", "limit")


@pytest.mark.parametrize("raw", NOT_ASCII_DECIMAL)
def test_a_listing_cursor_in_unicode_digits_is_a_400_not_a_500(
    client: TestClient, raw: str
) -> None:
    response = client.get(
        "/v1/streams", params={"cursor": f"{raw}.01m8te4w22bgrtg11agssrs9gz"}, headers=AUTH
    )
    assert_refused(response, 400, "invalid_cursor", "cursor")


@pytest.mark.parametrize("raw", NOT_ASCII_DECIMAL)
def test_a_read_token_expiry_in_unicode_digits_is_a_401_not_a_500(
    client: TestClient, stream: dict[str, Any], raw: str
) -> None:
    """No key is needed to send a token: the expiry must be refused as malformed, before any
    signature is computed."""
    stream_id, _, signature = stream["read_token"].split(".")
    token = f"{stream_id}.{raw}.{signature}"
    for path in (f"/v1/streams/{stream_id}", f"/v1/streams/{stream_id}/events"):
        response = get_events(client, path, params={"token": token})
        assert_refused(response, 401, "invalid_token")
        assert response.json()["error"]["message"] == "the read token is malformed"


@pytest.mark.parametrize("raw", NOT_ASCII_DECIMAL)
def test_a_last_event_id_query_in_unicode_digits_is_a_400(
    client: TestClient, stream: dict[str, Any], raw: str
) -> None:
    url = f"/v1/streams/{stream['id']}/events"
    response = get_events(client, url, params={"last_event_id": raw}, headers=AUTH)
    assert_refused(response, 400, "invalid_last_event_id")


@pytest.mark.parametrize("raw", NOT_ASCII_DECIMAL_HEADERS)
def test_a_last_event_id_header_in_unicode_digits_is_a_400(
    client: TestClient, stream: dict[str, Any], raw: str
) -> None:
    url = f"/v1/streams/{stream['id']}/events"
    response = get_events(client, url, headers={**AUTH, "Last-Event-ID": header_bytes(raw)})
    assert_refused(response, 400, "invalid_last_event_id")


@pytest.mark.parametrize("raw", NOT_ASCII_DECIMAL_HEADERS)
def test_a_content_length_in_unicode_digits_is_a_400_not_a_500(
    client: TestClient, raw: str
) -> None:
    headers: dict[str, Any] = {**AUTH, "Content-Type": "application/json"}
    headers["Content-Length"] = header_bytes(raw)
    response = client.post("/v1/streams", content=b"{}", headers=headers)
    assert_refused(response, 400, "invalid_request", "Content-Length")


@pytest.mark.parametrize("raw", [*NOT_ASCII_DECIMAL, "1e2", "1.", ".5", "\u0661.\u0665"])
def test_a_replay_speed_in_unicode_digits_is_a_400(
    client: TestClient, stream: dict[str, Any], raw: str
) -> None:
    url = f"/v1/streams/{stream['id']}/events"
    response = get_events(client, url, params={"replay": raw}, headers=AUTH)
    assert_refused(response, 400, "invalid_request", "replay")


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"limit": "7"}, {}),
        ({"limit": "007", "cursor": f"{2**40}.01m8te4w22bgrtg11agssrs9gz"}, {}),
        ({}, {"Content-Length": b"2"}),
        ({}, {"Content-Length": b" 2\t"}),  # HTTP strips blanks around a header value
    ],
)
def test_ascii_digits_are_still_read(
    client: TestClient, params: dict[str, str], headers: dict[str, Any]
) -> None:
    if headers:
        response = client.post(
            "/v1/streams",
            content=b"{}",
            headers={**AUTH, "Content-Type": "application/json", **headers},
        )
        assert_refused(response, 400, "invalid_request", "model")  # the body's turn: read
    else:
        assert client.get("/v1/streams", params=params, headers=AUTH).status_code == 200


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"last_event_id": "0"}, {}),
        ({"replay": "0.5"}, {}),
        ({"replay": "1000"}, {}),
        ({}, {"Last-Event-ID": b" 0\t"}),  # HTTP strips blanks around a header value
    ],
)
def test_ascii_resume_points_and_speeds_open_the_stream(
    client: TestClient, stream: dict[str, Any], params: dict[str, str], headers: dict[str, Any]
) -> None:
    url = f"/v1/streams/{stream['id']}/events"
    with client.stream("GET", url, params=params, headers={**AUTH, **headers}) as response:
        assert response.status_code == 200  # left unread: the stream is live
