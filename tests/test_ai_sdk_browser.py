"""A web page built on the Vercel AI SDK's chat client (``ai``'s ``AbstractChat`` and
``DefaultChatTransport``: ``tests/clients/node/chat-page/``) shows the broker's exact answer
in real headless Chromium, across a page reload in the middle of the stream and after it.

The page creates a generation (``POST /v1/streams``), keeps its id in ``sessionStorage`` and
reads ``/v1/streams/{id}/events?format=ai-sdk`` through the SDK, which validates every chunk
(``uiMessageChunkSchema``) and builds the assistant message from them. On load, it resumes the
stored stream with ``chat.resumeStream()``: the broker replays the whole message, then follows
it live, and the SDK rebuilds the message from the replay's ``start`` (``resumeStreamIsReplay``).
The fake model's text is known in advance (``expected_text``), so the page must show exactly
it: a chunk the SDK rejects, a token lost or doubled, a second assistant message all fail.

A network drop is the third case: the SDK reports it (``onFinish({isDisconnect: true})``)
but does not reconnect by itself; the page calls ``chat.resumeStream()`` then, and the same
replay repairs the message.

The page is bundled from the pinned ``ai`` package with esbuild and served by Playwright on
the api's origin (``tests/support/ai_sdk_page.py``). Waits are Playwright's (``expect``,
``wait_for_function``), never sleeps.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Locator, Page, Request, expect

from tests.support.ai_sdk_page import PAGE_PATH, Budgets, build_chat_page, serve_chat_page
from tests.support.browser import OpenPage, PageLog, ThreadedChaosProxy
from tests.support.generations import MESSAGES, expected_text, stream_state
from tests.support.processes import ApiProcess, api_and_worker
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

#: One token per event, progress every 200 ms: the most chunks (``data-progress`` among them).
WORKER_ENV = {"BROKER_BATCH_MAX_TOKENS": "1", "BROKER_PROGRESS_INTERVAL_MS": "200"}
PROMPT = MESSAGES[0]["content"]  # what ``expected_text`` was made for
STORAGE_KEY = "streambroker-chat:chat-page"
EVENTS_PATH = re.compile(r"^/v1/streams/[^/]+/events$")


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def chat_page_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return build_chat_page(tmp_path_factory.mktemp("chat-page"))


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    with api_and_worker(redis_server.url, worker_env=WORKER_ENV) as api:
        yield api


@pytest.fixture
def open_chat_page(open_page: OpenPage, chat_page_files: dict[str, bytes]) -> OpenPage:
    """``open_chat_page(origin, proxy=None, api=None)``: ``open_page``'s page, with the chat
    page served at ``<origin>/chat-test/`` (the api's origin, or a proxy's in front of it)."""

    def open_(origin: str, **routing: Any) -> tuple[Page, PageLog]:
        page, log = open_page(**routing)
        serve_chat_page(page, origin, chat_page_files)
        return page, log

    return open_


# ------------------------------------------------------------------------------- helpers


def page_url(origin: str, *, max_tokens: int, seed: int, rate: float) -> str:
    query = f"model=fake&max_tokens={max_tokens}&seed={seed}&tokens_per_second={rate}"
    return f"{origin}{PAGE_PATH}index.html?{query}"


def status(page: Page) -> Locator:
    return page.locator("#status")


def assistants(page: Page) -> Locator:
    return page.locator("#messages li[data-role=assistant]")


def send(page: Page, prompt: str) -> str:
    """Send a message from a freshly loaded page; the id of the stream the page stored."""
    expect(status(page)).to_have_text("ready")  # main.js ran
    page.locator("textarea[name=prompt]").fill(prompt)
    page.locator("#send").click()
    stored = page.wait_for_function(f"sessionStorage.getItem({STORAGE_KEY!r})").json_value()
    stream_id = json.loads(stored)["streamId"]
    assert isinstance(stream_id, str), stored
    assert re.fullmatch(r"[0-9a-z]{26}", stream_id), stored
    return stream_id


ANSWERED_OR_FAILED = """() => {
    const status = document.querySelector('#status').textContent;
    const answer = [...document.querySelectorAll('#messages li[data-role=assistant]')].at(-1);
    return status === 'error' || (status === 'ready' && answer?.dataset.finishReason);
}"""


def wait_answered(page: Page, *, through_errors: bool = False) -> None:
    """The assistant message got the ``finish`` chunk and the chat is ready again. The chat
    going to ``error`` fails at once, with the SDK's message (a chunk it rejected…), unless
    ``through_errors`` (the page resumes after a dropped connection)."""
    if not through_errors:
        page.wait_for_function(ANSWERED_OR_FAILED)
        error = page.locator("#error").text_content() or ""
        assert status(page).text_content() != "error", f"the chat failed: {error[:1500]}"
    expect(assistants(page).last).to_have_attribute("data-finish-reason", "stop")
    expect(status(page)).to_have_text("ready")


def shown(page: Page) -> str:
    """The last assistant message's text as the page shows it (whitespace kept)."""
    text: str = assistants(page).last.evaluate("e => e.textContent")
    return text


def assert_one_exact_answer(page: Page, stream_id: str, text: str, max_tokens: int) -> None:
    """The chat holds the prompt and one assistant message, the stream's, of exactly ``text``,
    with the ``finish`` chunk's metadata: the SDK's messages, not only the DOM."""
    expect(assistants(page)).to_have_count(1)
    assert shown(page) == text
    messages: list[dict[str, Any]] = page.evaluate("chat.messages")
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["parts"] == [{"type": "text", "text": PROMPT}]
    answer = messages[1]
    assert answer["id"] == stream_id  # the ``start`` chunk's messageId
    texts = [(part["text"], part["state"]) for part in answer["parts"] if part["type"] == "text"]
    assert texts == [(text, "done")]  # one text part, ended by ``text-end``
    assert [part["type"] for part in answer["parts"]] == ["step-start", "text"]
    metadata = answer["metadata"]
    assert metadata["model"] == "fake"
    assert metadata["finish_reason"] == "stop"
    assert metadata["usage"]["completion_tokens"] == max_tokens


class EventRequests:
    """The event-stream requests a page makes, with their Last-Event-ID header if any."""

    def __init__(self, page: Page) -> None:
        self.requests: list[tuple[str, str | None]] = []
        page.on("request", self._seen)

    def _seen(self, request: Request) -> None:
        url = urlsplit(request.url)
        if EVENTS_PATH.match(url.path):
            self.requests.append((url.query, request.headers.get("last-event-id")))


# --------------------------------------------------------------------------------- tests


def test_a_reload_in_the_middle_of_the_stream_shows_the_exact_answer(
    api: ApiProcess, open_chat_page: OpenPage
) -> None:
    max_tokens, seed = 100, 11  # 2.5 s at 40 tokens/s
    expected = expected_text(max_tokens, seed)
    page, log = open_chat_page(api.url)
    events = EventRequests(page)
    page.goto(page_url(api.url, max_tokens=max_tokens, seed=seed, rate=40))
    stream_id = send(page, PROMPT)
    expect(assistants(page)).to_have_text(re.compile(r"^\S+ \S+ \S+"))
    expect(status(page)).to_have_text("streaming")
    before = shown(page)
    assert stream_state(api.url, stream_id)["status"] == "running"
    assert expected.startswith(before)
    assert len(before) < len(expected)

    page.reload()
    # The replay shows text again while the generation still runs: the page follows it live.
    expect(assistants(page)).to_have_text(re.compile(r"^\S+ \S+ \S+"))
    assert stream_state(api.url, stream_id)["status"] == "running"
    wait_answered(page)
    assert_one_exact_answer(page, stream_id, expected, max_tokens)
    assert stream_state(api.url, stream_id)["text"] == expected
    # The transient ``data-progress`` chunks reached ``onData`` (and not the message's parts).
    expect(page.locator("#progress")).to_have_text(re.compile(r"^\d+ tokens$"))
    # One request per page load, the reload's with no Last-Event-ID: a replay from the start.
    assert events.requests == [("format=ai-sdk", None)] * 2
    assert log.errors == []


def test_a_reload_after_the_end_replays_the_whole_answer(
    api: ApiProcess, open_chat_page: OpenPage
) -> None:
    max_tokens, seed = 60, 12
    expected = expected_text(max_tokens, seed)
    page, log = open_chat_page(api.url)
    page.goto(page_url(api.url, max_tokens=max_tokens, seed=seed, rate=300))
    stream_id = send(page, PROMPT)
    wait_answered(page)
    assert_one_exact_answer(page, stream_id, expected, max_tokens)
    assert stream_state(api.url, stream_id)["status"] == "completed"

    page.reload()
    wait_answered(page)
    assert_one_exact_answer(page, stream_id, expected, max_tokens)
    assert log.errors == []


#: What the browser and the page log when the proxy drops a connection: expected there.
NETWORK_ERROR = re.compile(r"net::ERR_[A-Z_]+|chat error: TypeError: network error")


def test_a_dropped_connection_is_resumed_with_a_replay(
    api: ApiProcess, open_chat_page: OpenPage
) -> None:
    """The proxy cuts the page's first events connection after 1500 bytes (headers and a
    dozen tokens), then lets connections through. The SDK ends the response as a disconnect
    (``onFinish({isDisconnect: true})``, status ``error``) and does not reconnect by itself
    (``useChat({resume: true})`` does, once the tab becomes visible again): the page calls
    ``chat.resumeStream()``, and the replay replaces the cut message instead of adding to it."""
    max_tokens, seed = 80, 13
    expected = expected_text(max_tokens, seed)
    with ThreadedChaosProxy(api.port, cut_after=(1500, 1500)) as proxy:
        proxy.proxy.random = Budgets([1500])  # the first connection only; then no cut
        page, log = open_chat_page(proxy.url, proxy=proxy, api=api)
        events = EventRequests(page)
        page.goto(page_url(proxy.url, max_tokens=max_tokens, seed=seed, rate=40))
        stream_id = send(page, PROMPT)
        wait_answered(page, through_errors=True)
        assert proxy.cuts == 1
        assert proxy.connections == 2
    assert_one_exact_answer(page, stream_id, expected, max_tokens)
    assert events.requests == [("format=ai-sdk", None)] * 2
    assert [e for e in log.errors if not NETWORK_ERROR.search(e)] == []
    assert any("network error" in e for e in log.errors), log.errors  # it was cut, and seen
