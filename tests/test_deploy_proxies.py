"""infra/nginx/ and infra/haproxy/ stay true to the api: their timeouts outlast its
heartbeats and its longest generation, their body limits are its own, their headers reach
it. Then real nginx and HAProxy run the shipped files in front of small fake api processes
(``tests.support.proxies``), to check what each comment in their configurations promises:
streaming unbuffered, headers passed on, which requests are sent again to another api.
Without nginx or HAProxy those tests are skipped, except under ``CI=true``, where they fail
(``.ci/run`` installs them).
"""

from __future__ import annotations

import re
import socket
import time

import httpx
import pytest

from api import archive
from broker.settings import Settings
from tests.support.broker_exports import api_paths
from tests.support.deploy_files import HAPROXY_CFG, compose_api
from tests.support.proxies import PROXIES, Proxy, fake_apis, haproxy_in_front
from tests.support.proxy_configs import (
    haproxy_seconds,
    haproxy_sections,
    nginx_bytes,
    nginx_http,
    nginx_seconds,
)


def test_nginx_settings_follow_the_apis_timeouts_and_limits() -> None:
    http = nginx_http()
    (upstream,) = http.find("upstream")
    (server,) = http.find("server")
    api_launch = compose_api()
    api_settings = api_launch.settings.api
    # nginx closes idle api connections before uvicorn does.
    keep_alive = nginx_seconds(upstream.value("keepalive_timeout"))
    assert keep_alive < api_launch.uvicorn["timeout_keep_alive"]
    assert upstream.find("least_conn"), "long-lived streams want least_conn"
    assert server.value("proxy_buffering") == "off"
    assert server.value("gzip") == "off"
    assert server.value("proxy_http_version") == "1.1"
    headers = {d.args[0].lower(): d.args[1] for d in server.find("proxy_set_header")}
    assert headers["connection"] == ""
    assert headers["last-event-id"] == "$http_last_event_id"
    assert headers["x-forwarded-for"] == "$proxy_add_x_forwarded_for"
    assert headers["x-forwarded-proto"] == "$scheme"
    for location in server.find("location"):
        # A location that sets one header would inherit none of the server's.
        assert not location.find("proxy_set_header"), f"location {location.args}"
    heartbeat = api_settings.heartbeat_seconds
    for timeout in ("proxy_read_timeout", "proxy_send_timeout", "send_timeout"):
        assert nginx_seconds(server.value(timeout)) >= 2 * heartbeat, timeout
    job_timeout = api_launch.settings.generation.job_timeout_seconds
    chat = server.location("=", "/v1/chat/completions")
    assert nginx_seconds(chat.value("proxy_read_timeout")) >= job_timeout
    assert nginx_bytes(server.value("client_max_body_size")) == api_settings.max_body_bytes
    imports = server.location("=", "/v1/streams/import")
    assert nginx_bytes(imports.value("client_max_body_size")) == archive.MAX_IMPORT_BYTES
    retry = server.find("proxy_next_upstream")[0].args
    assert "non_idempotent" not in retry
    assert {"error", "timeout", "http_502", "http_503"} <= set(retry)
    (retry_safe,) = [d for d in server.find("location") if d.args == ["@retry_safe_create"]]
    assert "non_idempotent" in retry_safe.find("proxy_next_upstream")[0].args


def test_haproxy_settings_follow_the_apis_timeouts_and_limits() -> None:
    sections = haproxy_sections(HAPROXY_CFG.read_text())
    defaults = sections["defaults"]
    lines = [line for section in sections.values() for line in section]
    assert not [line for line in lines if "http-server-close" in line or "httpclose" in line]
    timeouts = {line.split()[1]: line.split()[2] for line in defaults if line.startswith("timeout")}
    api_launch = compose_api()
    heartbeat = api_launch.settings.api.heartbeat_seconds
    for name in ("server", "client", "tunnel"):
        assert haproxy_seconds(timeouts[name]) >= 2 * heartbeat, f"timeout {name}"
    backend = next(lines for name, lines in sections.items() if name.startswith("backend"))
    check = next(line for line in backend if line.startswith("http-check send"))
    assert "uri /readyz" in check
    assert "/readyz" in api_paths()
    assert any(line.startswith("balance leastconn") for line in backend)
    assert any(line.startswith("http-request disable-l7-retry unless") for line in backend)
    chat_timeout = next(line for line in backend if "set-timeout server" in line)
    job_timeout = api_launch.settings.generation.job_timeout_seconds
    assert haproxy_seconds(chat_timeout.split()[3]) >= job_timeout
    frontend = next(lines for name, lines in sections.items() if name.startswith("frontend"))
    limits = [int(n) for line in frontend for n in re.findall(r"content-length\) gt (\d+)", line)]
    assert sorted(limits) == sorted(
        [api_launch.settings.api.max_body_bytes, archive.MAX_IMPORT_BYTES]
    ), limits


@pytest.mark.parametrize("proxy", PROXIES)
def test_events_stream_through_the_proxy_as_they_come(proxy: Proxy) -> None:
    with fake_apis((200, 200)) as apis, proxy(apis) as url:
        (api,) = apis
        started = time.monotonic()
        with (
            httpx.Client(timeout=10) as client,
            client.stream(
                "GET",
                f"{url}/v1/streams/abc/events",
                headers={"Last-Event-ID": "41", "X-Forwarded-For": "203.0.113.9"},
            ) as response,
        ):
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:")) == "data: first"
            first_after = time.monotonic() - started
            api.release.set()
            rest = list(lines)
        # The first event came while the api still held the response open: not buffered.
        assert first_after < 2, f"the first event took {first_after:.1f} s: buffered"
        assert "data: last" in rest
        method, path, headers = api.requests[-1]
        assert (method, path) == ("GET", "/v1/streams/abc/events")
        assert headers["last-event-id"] == "41"
        assert headers["x-forwarded-for"].split(",")[-1].strip() == "127.0.0.1"
        assert headers["x-forwarded-proto"] == "http"


@pytest.mark.parametrize("proxy", PROXIES)
def test_gets_move_to_the_next_api_after_a_503(proxy: Proxy) -> None:
    with (
        fake_apis((503, 200), (503, 200), (200, 200)) as apis,
        proxy(apis) as url,
        httpx.Client(timeout=10) as client,
    ):
        for _ in range(4):
            response = client.get(f"{url}/v1/streams/abc")
            assert response.status_code == 200, response.text
            assert response.json()["port"] == apis[2].port


@pytest.mark.parametrize("proxy", PROXIES)
def test_a_create_goes_to_a_second_api_only_with_an_idempotency_key(proxy: Proxy) -> None:
    body = {"model": "fake", "messages": []}
    for path in ("/v1/streams", "/v1/chat/completions"):
        with (
            fake_apis((503, 200), (503, 200), (503, 200)) as apis,
            proxy(apis) as url,
            httpx.Client(timeout=10) as client,
        ):
            plain = client.post(f"{url}{path}", json=body)
            assert plain.status_code == 503
            assert sum(api.hits(path) for api in apis) == 1, f"{path} sent twice"
            keyed = client.post(f"{url}{path}", json=body, headers={"Idempotency-Key": "k1"})
            assert keyed.status_code in (502, 503)
            assert sum(api.hits(path) for api in apis) >= 3, f"{path} with a key: one try"
    # Any other POST is sent once, key or not.
    with (
        fake_apis((503, 200), (503, 200), (503, 200)) as apis,
        proxy(apis) as url,
        httpx.Client(timeout=10) as client,
    ):
        client.post(f"{url}/v1/streams/abc/cancel", headers={"Idempotency-Key": "k2"})
        assert sum(api.hits("/v1/streams/abc/cancel") for api in apis) == 1


@pytest.mark.parametrize("proxy", PROXIES)
def test_the_proxy_hides_metrics_and_refuses_large_bodies(proxy: Proxy) -> None:
    with fake_apis((200, 200)) as apis, proxy(apis) as url:
        with httpx.Client(timeout=10) as client:
            assert client.get(f"{url}/metrics").status_code == 404
        port = int(url.rsplit(":", 1)[1])
        limit = Settings().api.max_body_bytes
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /v1/streams HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (limit + 1)
            )
            answer = s.recv(65536).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 413"), answer
        assert apis[0].hits("/metrics") == 0
        assert apis[0].hits("/v1/streams") == 0


def test_haproxy_stops_sending_to_an_api_whose_readyz_fails() -> None:
    """A draining api (SIGTERM, --drain-seconds) answers /readyz 503 while it serves:
    HAProxy's active check takes it out of rotation."""
    with fake_apis((200, 503), (200, 200), (200, 200)) as apis, haproxy_in_front(apis) as url:
        draining = apis[0]
        deadline = time.monotonic() + 15
        while draining.hits("/readyz") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert draining.hits("/readyz") >= 2, "HAProxy never checked /readyz"
        time.sleep(0.5)
        with httpx.Client(timeout=10) as client:
            for _ in range(9):
                assert client.get(f"{url}/v1/streams/abc").status_code == 200
        assert draining.hits("/v1/streams/abc") == 0
        assert sum(api.hits("/v1/streams/abc") for api in apis[1:]) == 9
