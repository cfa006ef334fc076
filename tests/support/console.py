"""The operator console (``/console``) as its browser tests read it: a stream's view, its
phase and its output, and a stream read over HTTP to its terminal event."""

from __future__ import annotations

import json
from typing import Any

import httpx
from playwright.sync_api import Page, expect

from tests.support.generations import bearer


def finish(base: str, stream_id: str, key: str | None = None) -> list[dict[str, Any]]:
    """Read the stream's events until its terminal one (the response ends there)."""
    events: list[dict[str, Any]] = []
    url = f"{base}/v1/streams/{stream_id}/events"
    with httpx.stream("GET", url, headers=bearer(key), timeout=30) as response:
        assert response.status_code == 200
        kind = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append({"type": kind, **json.loads(line[len("data: ") :])})
    assert events[-1]["type"] in ("done", "error")
    return events


def stream_view(page: Page, stream_id: str) -> Any:
    return page.locator(f"[data-view=stream][data-stream-id='{stream_id}']")


def wait_ended(page: Page, stream_id: str) -> None:
    expect(stream_view(page, stream_id)).to_have_attribute("data-phase", "ended")


def output_text(page: Page) -> str:
    text: str = page.locator("[data-role=output]").evaluate("e => e.textContent")
    return text
