"""The operator console (``/console``) with API keys and read tokens on, in real headless
Chromium against real api and worker processes: without a key the lists are locked and say
why; a key entered in the page lists its tenant's streams, watches and exports one, and
cancels a running one; a read-token link (in the query or the hash) opens one stream,
read-only.

Every wait is Playwright's own (``expect``, ``wait_for_function``) or an SSE read that ends
with the stream; none is a sleep. Each view leaves a screenshot (1280 by 800, dark) in
``test-artifacts/console/`` at the repository root, or in ``$STREAMBROKER_SCREENSHOTS``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.support.browser import OpenPage, screenshot_dir
from tests.support.console import finish, output_text, stream_view, wait_ended
from tests.support.generations import create_stream, stream_state
from tests.support.processes import ApiProcess, api_and_worker
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


KEY_A = "key-of-tenant-a-0123456789"
KEY_B = "key-of-tenant-b-0123456789"
SECRET = "s" * 32


@pytest.fixture(scope="module")
def auth_api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    """A front-end with API keys on (tenants a and b), and a worker."""
    env = {
        "BROKER_HEARTBEAT_SECONDS": "0.5",
        "BROKER_API_KEYS": f"{KEY_A}:tenant-a,{KEY_B}:tenant-b",
        "BROKER_READ_TOKEN_SECRETS": SECRET,
    }
    with api_and_worker(redis_server.url, env) as api:
        yield api


def assert_locked_without_a_key(page: Page, errors: list[str], base: str) -> None:
    """No key: the table and the create panel say what is missing, and the browser logs each
    refused request (401), and nothing else."""
    page.goto(f"{base}/console")
    locked = page.locator("[data-role=table-state]")
    expect(locked).to_contain_text("Enter an API key to list streams")
    expect(locked).to_contain_text("401 unauthorized")
    expect(page.locator("tr[data-id]")).to_have_count(0)
    page.goto(f"{base}/console#/new")
    expect(page.locator("[data-role=create-auth]")).to_contain_text("Enter an API key")
    expect(page.locator("[data-role=create]")).to_be_disabled()
    assert errors  # the browser logs each refused request, and nothing else
    assert all("401" in error for error in errors), errors


def enter_the_key_then_watch_and_export(page: Page, base: str, stream_id: str, text: str) -> None:
    """A key entered in the page: the tenant's streams are listed, and a click watches one
    (with a read token the console gets for it: EventSource cannot send the key); export,
    which needs the key, saves the stream's file."""
    page.locator("#api-key").fill(KEY_A)
    page.locator("#auth button[type=submit]").click()
    expect(page.locator("#identity")).to_have_text("API key …6789")
    page.goto(f"{base}/console#/streams")
    row = page.locator(f"tr[data-id='{stream_id}']")
    expect(row.locator(".col-tenant")).to_have_text("tenant-a")
    row.locator(".col-model").click()
    wait_ended(page, stream_id)
    assert output_text(page) == text
    # Export needs the key: the console fetches it with the key and saves the file.
    with page.expect_download() as download:
        page.locator("[data-role=export]").click()
    assert download.value.suggested_filename == f"{stream_id}.jsonl"
    header = json.loads(Path(download.value.path()).read_text().splitlines()[0])
    assert header["format"] == "streambroker.stream"
    assert header["id"] == stream_id


def assert_read_only(reader: Page, stream_id: str, text: str) -> None:
    """A page opened with a read-token link: the stream's whole text, and a read-only view (a
    read token reads state and events only: no cancel, no export)."""
    wait_ended(reader, stream_id)
    assert output_text(reader) == text
    expect(reader.locator(".chip-readonly")).to_be_visible()
    expect(reader.locator("[data-role=cancel]")).to_be_disabled()
    expect(reader.locator("#identity")).to_contain_text("read token")
    # A read token reads state and events only: no export.
    expect(reader.locator("[data-role=export]")).to_be_disabled()


def test_auth_locks_the_lists_until_a_key_and_a_read_token_link_opens_one_stream(
    auth_api: ApiProcess, open_page: OpenPage
) -> None:
    screenshots = screenshot_dir("console")
    created = create_stream(auth_api.url, seed=7, max_tokens=25, key=KEY_A)
    stream_id, token = created["id"], created["read_token"]
    finish(auth_api.url, stream_id, key=KEY_A)
    expected = stream_state(auth_api.url, stream_id, key=KEY_A)["text"]

    page, log = open_page()
    assert_locked_without_a_key(page, log.errors, auth_api.url)
    enter_the_key_then_watch_and_export(page, auth_api.url, stream_id, expected)

    # A read-token link, in a fresh browser context (no key anywhere): read-only view.
    reader, reader_log = open_page()
    reader.goto(f"{auth_api.url}/console?stream={stream_id}&token={token}")
    assert_read_only(reader, stream_id, expected)
    reader.screenshot(path=screenshots / "read-token.png")
    assert reader_log.errors == []
    # The token may also come in the hash: #/streams/<id>?token=<read token>.
    hashed, hashed_log = open_page()
    hashed.goto(f"{auth_api.url}/console#/streams/{stream_id}?token={token}")
    wait_ended(hashed, stream_id)
    assert output_text(hashed) == expected
    assert hashed_log.errors == []
    # The same page without a key cannot list: the locked state, with a way back.
    reader.locator("nav a[data-route=streams]").click()
    expect(reader.locator("[data-role=table-state]")).to_contain_text(
        "Enter an API key to list streams"
    )
    reader.screenshot(path=screenshots / "auth-locked.png")


def test_with_an_api_key_cancel_ends_a_running_stream(
    auth_api: ApiProcess, open_page: OpenPage
) -> None:
    stream_id = create_stream(auth_api.url, seed=8, max_tokens=400, rate=20, key=KEY_A)["id"]
    page, log = open_page()
    page.goto(f"{auth_api.url}/console")
    page.locator("#api-key").fill(KEY_A)
    page.locator("#auth button[type=submit]").click()
    expect(page.locator("#identity")).to_have_text("API key …6789")
    log.errors.clear()  # the 401s of the first poll, before the key was entered
    page.goto(f"{auth_api.url}/console#/streams/{stream_id}")
    view = stream_view(page, stream_id)
    expect(view).to_have_attribute("data-phase", "streaming")
    cancel = page.locator("[data-role=cancel]")
    expect(cancel).to_be_enabled()
    cancel.click()
    expect(view).to_have_attribute("data-outcome", "cancelled")
    expect(page.locator("[data-role=status]")).to_have_text("cancelled")
    expect(cancel).to_be_disabled()
    final = stream_state(auth_api.url, stream_id, key=KEY_A)
    assert final["status"] == "cancelled"
    assert final["finish_reason"] == "cancelled"
    assert output_text(page) == final["text"]
    assert log.errors == []
