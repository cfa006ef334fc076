"""The operator console (``/console``) and the browser client (``/static/streambroker.js``) in
real headless Chromium (Debian's ``chromium``, driven by Playwright through
``executable_path``; no browser is downloaded), against real api and worker processes
without auth: the stream table and its live updates, a stream's view rendering the exact
text as it arrives, the replay at 1x and 10x, the create panel, and the browser client's
``watch()`` from the page (resuming after silences, telling a refusal from an ended stream).
The console with API keys and read tokens is in ``tests/test_console_auth.py``.

Every wait is Playwright's own (``expect``, ``wait_for_function``) or an SSE read that ends
with the stream; none is a sleep. Each view leaves a screenshot (1280 by 800, dark) in
``test-artifacts/console/`` at the repository root, or in ``$STREAMBROKER_SCREENSHOTS``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from tests.support.browser import OpenPage, screenshot_dir
from tests.support.console import finish, output_text, stream_view, wait_ended
from tests.support.generations import MESSAGES, create_stream, stream_state
from tests.support.processes import ApiProcess, api_and_worker
from tests.support.redis_server import RedisServer
from workers.providers.fake import fake_tokens

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


PROMPT = MESSAGES  # what create_stream sends


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    with api_and_worker(redis_server.url, {"BROKER_HEARTBEAT_SECONDS": "0.5"}) as api:
        yield api


@pytest.fixture(scope="module")
def screenshots() -> Path:
    return screenshot_dir("console")


# --------------------------------------------------------------------------------- tests


def test_the_console_loads_without_errors(api: ApiProcess, open_page: OpenPage) -> None:
    page, log = open_page()
    response = page.goto(f"{api.url}/console")
    assert response is not None
    assert response.status == 200
    assert "script-src 'self'" in response.headers["content-security-policy"]
    expect(page.locator("[data-view=streams]")).to_be_visible()
    # A poll answered: the indicator says live, the table or its empty state is shown.
    expect(page.locator("[data-role=live]")).to_have_text(re.compile("live"))
    expect(page.locator("[data-role=count]")).to_have_text(re.compile(r"\d+ streams? shown"))
    page.locator("nav a[data-route=create]").click()
    expect(
        page.locator("[data-view=create] select[name=model] option[value=fake]")
    ).to_be_attached()
    assert log.errors == []


def test_the_table_lists_streams_and_updates_live(
    api: ApiProcess, open_page: OpenPage, screenshots: Path
) -> None:
    done = create_stream(api.url, max_tokens=20, seed=1)["id"]
    failed = create_stream(api.url, max_tokens=20, seed=2, fail_after_tokens=2)["id"]
    cancelled = create_stream(api.url, seed=3, max_tokens=100, rate=10)["id"]
    httpx.post(f"{api.url}/v1/streams/{cancelled}/cancel", timeout=10)
    # A few more, so that the screenshot looks like a day's work.
    more = [
        create_stream(api.url, seed=s, max_tokens=s * 3, rate=s * 10)["id"] for s in range(20, 24)
    ]
    for stream_id in more:
        finish(api.url, stream_id)
    running = create_stream(api.url, seed=3, max_tokens=200, rate=20)["id"]
    finish(api.url, done)
    finish(api.url, failed)
    finish(api.url, cancelled)
    page, log = open_page()
    page.goto(f"{api.url}/console")
    statuses = {done: "completed", failed: "failed", cancelled: "cancelled", running: "running"}
    for stream_id, status in statuses.items():
        row = page.locator(f"tr[data-id='{stream_id}']")
        expect(row).to_be_visible()
        expect(row.locator(".col-id")).to_have_text(stream_id[-9:])
        expect(row.locator(".col-status")).to_have_text(status)
        expect(row.locator(".col-model")).to_have_text("fake")
    expect(page.locator(f"tr[data-id='{done}'] .col-tokens")).to_have_text("20")
    # Newest first, and a stream created now shows up at the top by itself.
    newest = create_stream(api.url, seed=4, max_tokens=100, rate=50)["id"]
    expect(page.locator("tbody[data-role=rows] tr").first).to_have_attribute("data-id", newest)
    expect(page.locator(f"tr[data-id='{newest}'] .col-status")).to_have_text(
        re.compile("queued|running")
    )
    # The status filter narrows the rows (and lives in the link).
    page.locator("[data-role=filter-status]").select_option("failed")
    expect(page.locator(f"tr[data-id='{done}']")).to_have_count(0)
    expect(page.locator(f"tr[data-id='{failed}']")).to_be_visible()
    assert "status=failed" in page.url
    page.locator("[data-role=filter-status]").select_option("")
    expect(page.locator(f"tr[data-id='{done}']")).to_be_visible()
    page.screenshot(path=screenshots / "table.png")
    page.emulate_media(color_scheme="light")
    page.screenshot(path=screenshots / "table-light.png")
    assert log.errors == []
    for stream_id in (running, newest):
        httpx.post(f"{api.url}/v1/streams/{stream_id}/cancel", timeout=10)


def test_a_click_opens_the_stream_and_renders_the_exact_text_as_it_arrives(
    api: ApiProcess, open_page: OpenPage, screenshots: Path
) -> None:
    stream_id = create_stream(api.url, seed=5, max_tokens=40, rate=15)["id"]  # about 2.7 s
    page, log = open_page()
    page.goto(f"{api.url}/console")
    page.locator(f"tr[data-id='{stream_id}'] .col-model").click()
    expect(page).to_have_url(re.compile(f"#/streams/{stream_id}$"))
    view = stream_view(page, stream_id)
    expect(view).to_be_visible()
    # Evaluated in the page at one instant: some text is shown and the stream has not ended.
    partial = page.wait_for_function(
        """() => {
            const view = document.querySelector("[data-view=stream]");
            const text = document.querySelector("[data-role=output]").textContent;
            return text.length > 0 && view.dataset.phase === "streaming" && text;
        }""",
        polling="raf",
    ).json_value()
    expect(view).to_have_attribute("data-conn", "open")
    expect(page.locator("[data-role=progress-text]")).to_have_text(re.compile("tokens"))
    page.screenshot(path=screenshots / "stream-live.png")
    wait_ended(page, stream_id)
    expect(view).to_have_attribute("data-outcome", "completed")
    expect(view).to_have_attribute("data-conn", "closed")
    text = output_text(page)
    assert text == stream_state(api.url, stream_id)["text"]
    assert text == "".join(fake_tokens(PROMPT, 40, 5))
    assert partial
    assert text.startswith(partial)
    assert len(partial) < len(text)
    expect(page.locator("[data-role=status]")).to_have_text("completed")
    expect(page.locator("[data-role=log] tr")).to_have_count(
        stream_state(api.url, stream_id)["last_event_id"]
    )
    assert log.errors == []


def test_replay_at_10x_finishes_about_ten_times_faster_than_at_1x(
    api: ApiProcess, open_page: OpenPage, screenshots: Path
) -> None:
    stream_id = create_stream(api.url, seed=6, max_tokens=48, rate=40)["id"]  # about 1.2 s
    events = finish(api.url, stream_id)
    span = (events[-1]["t"] - events[0]["t"]) / 1000
    assert span > 0.9
    expected = stream_state(api.url, stream_id)["text"]
    page, log = open_page()
    view = stream_view(page, stream_id)

    def replay_seconds() -> float:
        page.wait_for_function(
            """() => {
                const view = document.querySelector("[data-view=stream]");
                return view.dataset.phase === "ended" && view.dataset.elapsedMs !== undefined;
            }""",
        )
        expect(view).to_have_attribute("data-outcome", "completed")
        assert output_text(page) == expected
        return int(view.get_attribute("data-elapsed-ms") or "0") / 1000

    page.goto(f"{api.url}/console#/streams/{stream_id}?mode=replay&speed=1")
    expect(view).to_have_attribute("data-mode", "replay")
    slow = replay_seconds()
    # The speed selector restarts the replay at once.
    page.locator("[data-role=speed]").select_option("10")
    assert page.url.endswith(f"#/streams/{stream_id}?mode=replay&speed=10")
    fast = replay_seconds()
    times = "\N{MULTIPLICATION SIGN}"
    expect(page.locator("[data-role=elapsed]")).to_have_text(re.compile(f"replayed at 10{times}"))
    page.screenshot(path=screenshots / "stream-replay.png")
    assert span * 0.85 <= slow <= span + 0.6, (span, slow)
    assert fast <= span / 10 + 0.4, (span, fast)
    assert slow / fast > 4, (slow, fast)
    assert log.errors == []


def test_the_create_panel_creates_a_fake_generation_with_its_options(
    api: ApiProcess, open_page: OpenPage, screenshots: Path
) -> None:
    page, log = open_page()
    page.goto(f"{api.url}/console#/new")
    form = page.locator("[data-view=create] form")
    expect(form.locator("select[name=model] option[value=fake]")).to_be_attached()
    prompt = "Console, say something  with  spaces"
    form.locator("[name=prompt]").fill(prompt)
    form.locator("[name=max_tokens]").fill("30")
    form.locator("[name=tokens_per_second]").fill("60")
    form.locator("[name=seed]").fill("5")
    form.locator("[data-role=add-metadata]").click()
    form.locator("[name=meta-key]").fill("case")
    form.locator("[name=meta-value]").fill("console")
    preview = json.loads(page.locator("[data-role=preview]").text_content() or "")
    assert preview["fake"] == {"tokens_per_second": 60, "fail_after_tokens": None, "seed": 5}
    page.screenshot(path=screenshots / "create.png")
    form.locator("[data-role=create]").click()
    expect(page).to_have_url(re.compile(r"#/streams/[0-9a-z]{26}$"))
    stream_id = page.url.rsplit("/", 1)[1]
    wait_ended(page, stream_id)
    messages = [{"role": "user", "content": prompt}]
    got = stream_state(api.url, stream_id)
    assert output_text(page) == got["text"] == "".join(fake_tokens(messages, 30, 5))
    assert got["metadata"] == {"case": "console"}
    assert got["usage"]["completion_tokens"] == 30

    # fail_after_tokens: the stream ends with its `error` event, shown; no reconnect (an SSE
    # event named "error" is not a connection error).
    page.goto(f"{api.url}/console#/new")
    form.locator("[name=fail_after_tokens]").fill("3")
    form.locator("[data-role=create]").click()
    expect(page).to_have_url(re.compile(r"#/streams/[0-9a-z]{26}$"))
    failed_id = page.url.rsplit("/", 1)[1]
    view = stream_view(page, failed_id)
    wait_ended(page, failed_id)
    expect(view).to_have_attribute("data-outcome", "failed")
    expect(view).to_have_attribute("data-conn", "closed")
    expect(page.locator("[data-role=stream-error]")).to_contain_text("fake_failure")
    expect(page.locator("[data-role=client-stats]")).to_contain_text("0 reconnects")
    assert output_text(page) == stream_state(api.url, failed_id)["text"]
    assert stream_state(api.url, failed_id)["status"] == "failed"
    assert log.errors == []


# ------------------------------------------------------------ the browser client's watch()


# A watch from the page's own JavaScript, through the public API of streambroker.js; resolves
# with what the handlers saw once the watch has closed.
WATCH_JS = """async ([target, options]) => {
    const { watch } = await import("/static/streambroker.js");
    return await new Promise((resolve) => {
        const seen = { text: "", ids: [], states: [], done: null, error: null, doneEvent: null };
        const watcher = watch(target, {
            onToken: (text) => { seen.text += text; },
            onEvent: (event) => { seen.ids.push(event.id); },
            onDone: (done, event) => { seen.done = done; seen.doneEvent = event && event.id; },
            onError: (error) => { seen.error = { code: error.code, kind: error.kind,
                                                 status: error.status }; },
            onStateChange: (state) => {
                seen.states.push(state);
                if (state === "closed") resolve({ ...seen, stats: { ...watcher.stats } });
            },
        }, options);
    });
}"""


def test_the_browser_client_resumes_after_a_silent_connection_without_loss(
    api: ApiProcess, open_page: OpenPage
) -> None:
    page, _ = open_page()
    page.goto(f"{api.url}/console#/new")
    stream_id = create_stream(api.url, seed=9, max_tokens=8, rate=3)["id"]  # a token every 333 ms
    # Shorter than the gaps between events: every silence replaces the connection.
    seen = page.evaluate(WATCH_JS, [{"streamId": stream_id}, {"heartbeatTimeoutMs": 120}])
    final = stream_state(api.url, stream_id)
    assert seen["text"] == final["text"]
    assert seen["ids"] == list(range(1, final["last_event_id"] + 1))  # each once, in order
    assert seen["done"]["finish_reason"] == "stop"
    assert seen["stats"]["heartbeatTimeouts"] >= 3
    assert seen["stats"]["reconnects"] >= seen["stats"]["heartbeatTimeouts"]
    assert "reconnecting" in seen["states"]
    assert seen["states"][-1] == "closed"
    assert seen["stats"]["tokens"] == 8
    assert seen["stats"]["timeToFirstTokenMs"] is not None


def test_the_browser_client_tells_a_final_refusal_and_an_ended_stream_apart(
    api: ApiProcess, open_page: OpenPage
) -> None:
    stream_id = create_stream(api.url, seed=10, max_tokens=5)["id"]
    events = finish(api.url, stream_id)
    page, _ = open_page()
    page.goto(f"{api.url}/console#/new")
    # An unknown stream: EventSource gives up on the 404; the client learns why and stops.
    missing = page.evaluate(WATCH_JS, [{"streamId": "01m7zg35f6ys8701yg1hhg2w5d"}, {}])
    assert missing["error"] == {"code": "stream_not_found", "kind": "http", "status": 404}
    assert missing["done"] is None
    # Resuming at the terminal event answers 204: the stream ended, reported from its state.
    last = len(events)
    ended = page.evaluate(WATCH_JS, [f"/v1/streams/{stream_id}/events?last_event_id={last}", {}])
    assert ended["error"] is None
    assert ended["done"] == {
        "finish_reason": "stop",
        "usage": stream_state(api.url, stream_id)["usage"],
    }
    assert ended["doneEvent"] is None
    assert ended["ids"] == []
