"""The browser client (``/static/streambroker.js``) and the chat demo (``/``) in real headless
Chromium (Debian's ``chromium`` through Playwright's ``executable_path``), against real api
and worker processes, on a hostile network: a proxy that cuts every events connection after a
few hundred bytes, one that goes silent instead, 503 answers and refused connections.

The api sends ``retry: 50`` and a heartbeat every 0.5 s; the worker appends every token as its
own event (``BROKER_BATCH_MAX_TOKENS=1``): the most events, and so the most cuts, for a page
to survive, and the worst case for its rendering. Through a proxy, only the events connections
cross it (``route_around_proxy``); the page and its modules come straight from the api.

Waits are Playwright's own (``expect``) or polls with a deadline. Proving that nothing happens
(no reconnect after the end) needs a window of time: it is polled every 100 ms and fails at the
first request. Screenshots go to ``test-artifacts/demo/`` (or ``$STREAMBROKER_SCREENSHOTS``).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Locator, Page, Request, Route, expect

from tests.support.browser import TIMEOUT_MS, OpenPage, ThreadedChaosProxy, screenshot_dir
from tests.support.generations import create_stream, stream_state
from tests.support.processes import ApiProcess, Launcher, api_and_worker
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

KEY = "key-of-tenant-a-0123456789"
SECRET = "s" * 32
# A buffer that holds a whole test stream: a browser slowed by a loaded machine then never
# overflows into coalesced catch-up, so "one event per token" holds whatever the load.
API_ENV = {
    "BROKER_RETRY_MS": "50",
    "BROKER_HEARTBEAT_SECONDS": "0.5",
    "BROKER_SUBSCRIBER_BUFFER_FRAMES": "1000",
}
WORKER_ENV = {"BROKER_BATCH_MAX_TOKENS": "1", "BROKER_PROGRESS_INTERVAL_MS": "200"}
EVENTS_PATH = re.compile(r"^/v1/streams/[^/]+/events$")


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    with api_and_worker(redis_server.url, API_ENV, worker_env=WORKER_ENV) as api:
        yield api


@pytest.fixture(scope="module")
def auth_api(redis_server: RedisServer, api: ApiProcess) -> Iterator[ApiProcess]:
    """A second front-end with an API key; the ``api`` fixture's worker serves both."""
    env = {**API_ENV, "BROKER_API_KEYS": f"{KEY}:tenant-a", "BROKER_READ_TOKEN_SECRETS": SECRET}
    with Launcher(redis_server.url) as launch:
        yield launch.api(env)


@pytest.fixture(scope="module")
def screenshots() -> Path:
    return screenshot_dir("demo")


# ------------------------------------------------------------------------------- helpers


def chat(page: Page) -> Locator:
    return page.locator("#chat")


def ask(page: Page, prompt: str, *, max_tokens: int, rate: float) -> str:
    """Type a prompt with the fake model's options, send it; the new stream's id."""
    page.locator("[name=max_tokens]").fill(str(max_tokens))
    page.locator("[name=tokens_per_second]").fill(str(rate))
    page.locator("textarea[name=prompt]").fill(prompt)
    page.locator("[data-role=send]").click()
    expect(chat(page)).to_have_attribute("data-stream-id", re.compile(r"^[0-9a-z]{26}$"))
    stream_id = chat(page).get_attribute("data-stream-id")
    assert stream_id is not None
    return stream_id


def wait_ended(page: Page, outcome: str = "completed") -> None:
    expect(chat(page)).to_have_attribute("data-phase", "ended", timeout=TIMEOUT_MS)
    expect(chat(page)).to_have_attribute("data-outcome", outcome)


def answer(page: Page) -> str:
    text: str = page.locator("[data-role=answer]").last.evaluate("e => e.textContent")
    return text


def client_stats(page: Page) -> dict[str, Any]:
    """The watcher's ``stats``, and the DOM updates the page made for the answer."""
    stats: dict[str, Any] = page.evaluate(
        "() => ({ ...streambrokerDemo.watcher.stats, renders: streambrokerDemo.turn.renders })"
    )
    return stats


class EventRequests:
    """Every request a page makes for an event stream (EventSource, and the client's probes)."""

    def __init__(self, page: Page) -> None:
        self.urls: list[str] = []
        page.on("request", self._seen)

    def _seen(self, request: Request) -> None:
        if EVENTS_PATH.match(urlsplit(request.url).path):
            self.urls.append(request.url)


#: What the browser logs for each connection the network (or the test) broke: expected here.
NETWORK_ERROR = re.compile(r"net::ERR_[A-Z_]+|responded with a status of 503")


def unexpected(errors: list[str]) -> list[str]:
    return [error for error in errors if not NETWORK_ERROR.search(error)]


def assert_no_more_requests(page: Page, *seen: EventRequests, seconds: float) -> None:
    """No new event-stream request for ``seconds``, polled (and failing at the first)."""
    before = [len(requests.urls) for requests in seen]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        page.wait_for_timeout(100)  # Playwright delivers the pages' request events meanwhile
        now = [len(requests.urls) for requests in seen]
        assert now == before, [r.urls[n:] for r, n in zip(seen, before, strict=True)]


# --------------------------------------------------------------------------------- tests


def test_the_demo_renders_the_exact_answer_while_a_proxy_cuts_the_connection_again_and_again(
    api: ApiProcess, open_page: OpenPage
) -> None:
    with ThreadedChaosProxy(api.port, cut_after=(200, 800), seed=1) as proxy:
        page, log = open_page(proxy=proxy, api=api)
        page.goto(f"{proxy.url}/?heartbeat_ms=1500")
        stream_id = ask(page, "Tell me about  durable logs", max_tokens=150, rate=150)
        wait_ended(page)
        final = stream_state(api.url, stream_id)
        stats = client_stats(page)
        assert final["status"] == "completed"
        assert answer(page) == final["text"]  # every token once, in order, whitespace kept
        assert len(final["text"].split()) == 150
        assert proxy.cuts >= 10, proxy.cuts
        assert stats["reconnects"] > 0, stats
        assert stats["tokenEvents"] == stats["tokens"] == 150  # no event lost or repeated
        expect(page.locator("[data-role=conn]")).to_have_text("closed")
        expect(page.locator("[data-role=progress-text]")).to_contain_text("150 tokens")
        assert unexpected(log.errors) == []


def test_after_the_end_the_page_stops_reconnecting(api: ApiProcess, open_page: OpenPage) -> None:
    """After ``done`` (the response ends there; a bare EventSource would reconnect and get
    204), and after the SSE event named ``error`` (which is not a connection error), no
    events request is made again: not after ``retry:`` (50 ms), not after the heartbeat
    timeout (1 s)."""
    failing = create_stream(api.url, max_tokens=40, rate=200, fail_after_tokens=12)["id"]
    with ThreadedChaosProxy(api.port, cut_after=(300, 900), seed=2) as proxy:
        page, log = open_page(proxy=proxy, api=api)
        requests = EventRequests(page)
        page.goto(f"{proxy.url}/?heartbeat_ms=1000")
        stream_id = ask(page, "A short one", max_tokens=40, rate=200)
        viewer, viewer_log = open_page()
        viewer_requests = EventRequests(viewer)
        viewer.goto(f"{api.url}/?watch={failing}&heartbeat_ms=1000")
        wait_ended(page)
        wait_ended(viewer, "failed")
        connections = proxy.connections
        assert_no_more_requests(page, requests, viewer_requests, seconds=2.5)
        assert proxy.connections == connections
    assert answer(page) == stream_state(api.url, stream_id)["text"]
    assert answer(viewer) == stream_state(api.url, failing)["text"]
    expect(viewer.locator("[data-role=answer-error]")).to_contain_text("fake_failure")
    for ended in (page, viewer):
        expect(ended.locator("[data-role=conn]")).to_have_text("closed")
    assert client_stats(viewer)["reconnects"] == 0
    assert len(viewer_requests.urls) == 1
    assert unexpected(log.errors) == viewer_log.errors == []


def test_stop_cancels_the_generation(api: ApiProcess, open_page: OpenPage) -> None:
    page, log = open_page()
    requests = EventRequests(page)
    page.goto(f"{api.url}/?heartbeat_ms=1000")
    stream_id = ask(page, "Go on for a while", max_tokens=2000, rate=20)
    expect(chat(page)).to_have_attribute("data-phase", "streaming")
    expect(page.locator("[data-role=answer]")).to_contain_text(re.compile(r"\S+ \S+ \S+"))
    page.locator("[data-role=stop]").click()
    wait_ended(page, "cancelled")
    expect(page.locator("[data-role=outcome]")).to_have_text("stopped: cancelled")
    expect(page.locator("[data-role=send]")).to_be_visible()
    final = stream_state(api.url, stream_id)
    assert final["status"] == "cancelled"
    assert final["finish_reason"] == "cancelled"
    assert answer(page) == final["text"]
    assert 3 <= len(final["text"].split()) < 200
    assert_no_more_requests(page, requests, seconds=1.5)
    assert len(requests.urls) == 1
    assert client_stats(page)["reconnects"] == 0
    assert log.errors == []


def test_a_watch_link_with_a_read_token_shows_the_same_answer_in_another_tab(
    auth_api: ApiProcess, open_page: OpenPage, screenshots: Path
) -> None:
    page, log = open_page()
    page.goto(f"{auth_api.url}/")
    # Auth is on: listing the models answered 401, and the page asks for a key.
    expect(page.locator("[data-role=key-form]")).to_be_visible()
    expect(page.locator("[data-role=notice]")).to_contain_text("enter an API key")
    page.locator("#api-key").fill(KEY)
    page.locator("[data-role=key-form] button[type=submit]").click()
    expect(page.locator("[data-role=key-toggle]")).to_have_text("API key …6789")
    expect(page.locator("[data-role=key-form]")).to_be_hidden()
    log.errors.clear()  # the browser logged the 401 of the first models request
    stream_id = ask(page, "Tell everyone about\n  read tokens", max_tokens=160, rate=40)
    link = page.locator("[data-role=watch-link]")
    expect(link).to_be_visible()
    href = link.get_attribute("href") or ""
    assert re.fullmatch(rf"/\?watch={stream_id}&token={stream_id}\.\d+\.[\w-]+", href), href

    # Another browser context: no key, no sessionStorage; the read token is all it has.
    viewer, viewer_log = open_page(color_scheme="light")
    viewer.goto(f"{auth_api.url}{href}")
    expect(chat(viewer)).to_have_attribute("data-mode", "watch")
    expect(chat(viewer)).to_have_attribute("data-phase", "streaming")  # joined while live
    expect(viewer.locator("[data-role=composer]")).to_be_hidden()
    expect(viewer.locator(".msg.user .bubble")).to_have_text("Tell everyone about\n  read tokens")
    wait_ended(page)
    wait_ended(viewer)
    final = stream_state(auth_api.url, stream_id, KEY)
    assert answer(page) == answer(viewer) == final["text"]
    page.screenshot(path=screenshots / "demo.png")
    viewer.screenshot(path=screenshots / "demo-watch.png")
    phone, phone_log = open_page(color_scheme="light", viewport={"width": 390, "height": 760})
    phone.goto(f"{auth_api.url}{href}")
    wait_ended(phone)
    assert answer(phone) == final["text"]
    phone.evaluate("window.scrollTo(0, 0)")  # it followed the text down; show it all
    phone.screenshot(path=screenshots / "demo-watch-phone.png", full_page=True)
    assert log.errors == viewer_log.errors == phone_log.errors == []


def test_the_client_backs_off_by_itself_after_503s_and_refused_connections(
    api: ApiProcess, open_page: OpenPage
) -> None:
    """The first connection is cut by the proxy; the events requests after it fail, as while
    a broker restarts: refused (EventSource would retry at ``retry:``, 50 ms, forever) and 503
    (EventSource gives up for good). The client backs off on its own and resumes exactly."""
    failures = ["refused", "503", "refused", "503", "503"]
    served: list[tuple[str, float]] = []

    def flaky(route: Route) -> None:
        kind = "ok" if not served or len(served) > len(failures) else failures[len(served) - 1]
        served.append((kind, time.monotonic()))
        if kind == "refused":
            route.abort("connectionrefused")
        elif kind == "503":
            error = {"code": "store_unavailable", "message": "the store is restarting"}
            route.fulfill(status=503, json={"error": error})
        else:
            route.continue_()

    with ThreadedChaosProxy(api.port, cut_after=(900, 1500), seed=3) as proxy:
        page, log = open_page(proxy=proxy, api=api)
        page.route(re.compile(re.escape(proxy.url) + r"/v1/streams/[^/?]+/events"), flaky)
        page.goto(f"{proxy.url}/?heartbeat_ms=3000")
        stream_id = ask(page, "Survive a restart", max_tokens=120, rate=120)
        wait_ended(page)
    final = stream_state(api.url, stream_id)
    assert answer(page) == final["text"]
    kinds = [kind for kind, _ in served]
    assert kinds[: len(failures) + 2] == ["ok", *failures, "ok"], kinds
    # Its own backoff, growing (0.5 s doubling, jitter over the upper half), where EventSource
    # would retry after 50 ms (refused) or never (503):
    # 1 refused (EventSource's reconnect)   -> backoff 0.25-0.5 s -> 2 503 (a new EventSource)
    # 3 refused (the client's probe of 2)   -> backoff 0.5-1 s    -> 4 503 (a new EventSource)
    # 5 503 (the probe of 4)                -> backoff 1-2 s      -> 6 ok, and resumed
    at = [when for _, when in served]
    gaps = [round(at[2] - at[1], 3), round(at[4] - at[3], 3), round(at[6] - at[5], 3)]
    print("\nbackoff gaps", gaps, [round(b - a, 3) for a, b in itertools.pairwise(at[:8])])
    assert gaps[0] >= 0.2, gaps
    assert gaps[1] >= 0.4, gaps
    assert gaps[2] >= 0.8, gaps
    stats = client_stats(page)
    assert stats["reconnects"] >= 4, stats
    assert stats["connectionErrors"] >= 3, stats
    assert unexpected(log.errors) == []


def test_a_silent_connection_is_replaced_after_the_heartbeat_timeout_and_a_quiet_one_is_not(
    api: ApiProcess, open_page: OpenPage
) -> None:
    # Quiet but alive: two tokens 3 s apart, a 1.5 s timeout. The broker's heartbeat events
    # (every 0.5 s) keep the connection: no reconnect. (A `: ping` comment would not: scripts
    # never see comments.)
    quiet, quiet_log = open_page()
    quiet.goto(f"{api.url}/?heartbeat_ms=1500")
    quiet_id = ask(quiet, "Take your time", max_tokens=2, rate=1 / 3)

    # Dead: the proxy stops forwarding after some bytes and keeps the connection open.
    with ThreadedChaosProxy(api.port, cut_after=(1200, 2400), seed=4, stall=True) as proxy:
        page, log = open_page(proxy=proxy, api=api)
        page.goto(f"{proxy.url}/?heartbeat_ms=1500")
        stream_id = ask(page, "Keep talking", max_tokens=60, rate=60)
        wait_ended(page)
        wait_ended(quiet)
        stalls = proxy.cuts
    stats = client_stats(page)
    assert answer(page) == stream_state(api.url, stream_id)["text"]
    assert stalls >= 1
    assert 1 <= stats["heartbeatTimeouts"] <= stalls, (stats, stalls)
    assert stats["connectionErrors"] == 0  # only the deadline could tell
    quiet_stats = client_stats(quiet)
    assert answer(quiet) == stream_state(api.url, quiet_id)["text"]
    assert quiet_stats["heartbeatTimeouts"] == quiet_stats["reconnects"] == 0, quiet_stats
    assert quiet_stats["heartbeats"] >= 2, quiet_stats
    assert unexpected(log.errors) == quiet_log.errors == []


def test_tokens_are_rendered_once_per_animation_frame(
    api: ApiProcess, open_page: OpenPage, record_property: Callable[[str, object], None]
) -> None:
    page, log = open_page()
    page.goto(f"{api.url}/")
    stream_id = ask(page, "As fast as you can", max_tokens=300, rate=2000)
    wait_ended(page)
    stats = client_stats(page)
    assert answer(page) == stream_state(api.url, stream_id)["text"]
    assert stats["tokenEvents"] == 300, stats  # one event per token (BROKER_BATCH_MAX_TOKENS=1)
    assert stats["renders"] == stats["flushes"]  # one DOM update per onToken call
    saving = 1 - stats["flushes"] / stats["tokenEvents"]
    record_property("token_events", stats["tokenEvents"])
    record_property("renders", stats["renders"])
    print(f"\nbatching: {stats['tokenEvents']} token events -> {stats['renders']} renders")
    assert saving > 0.5, stats
    expect(page.locator("[data-role=stats]")).to_contain_text(
        f"300 token events → {stats['flushes']} renders (\N{MINUS SIGN}{round(saving * 100)}%)"
    )
    assert log.errors == []
