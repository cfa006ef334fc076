"""What the browser tests share: Debian's Chromium driven by Playwright (``executable_path``,
no browser download), page logs, screenshot directories, and a ``ChaosProxy`` that sync
Playwright code can put in front of an api process.

Playwright's sync API owns the test thread's event loop, so the (asyncio) proxy runs on a
thread of its own with its own loop.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Route,
    sync_playwright,
)

from tests.support.background import Background, LoopThread
from tests.support.chaos_proxy import ChaosProxy
from tests.support.processes import ROOT, ApiProcess


def chromium_path() -> str:
    """Debian's chromium; without it, skip locally but fail under CI."""
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; the browser tests must not be skipped under CI")
        pytest.skip(message)
    return path


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium, closed on exit."""
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def screenshot_dir(name: str) -> Path:
    """``test-artifacts/<name>/`` at the repository root, or ``$STREAMBROKER_SCREENSHOTS``."""
    directory = Path(os.environ.get("STREAMBROKER_SCREENSHOTS") or ROOT / "test-artifacts" / name)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class PageLog:
    """Console messages of level error and uncaught exceptions of one page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


class ThreadedChaosProxy(Background):
    """``ChaosProxy`` (same arguments) on its own thread and event loop."""

    def __init__(self, upstream_port: int, **options: Any) -> None:
        self.proxy = ChaosProxy(upstream_port, **options)
        self._loop = LoopThread(exception_handler=_quiet_cancellations)

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cuts(self) -> int:
        return self.proxy.cuts

    @property
    def connections(self) -> int:
        return self.proxy.connections

    def start(self) -> None:
        self._loop.start()
        self._loop.run(self.proxy.__aenter__(), timeout=10)

    def stop(self) -> None:
        self._loop.run(self.proxy.__aexit__(None, None, None), timeout=10)
        self._loop.stop()


def _quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Python 3.11's asyncio reports a connection task cancelled at the proxy's exit (an idle
    keep-alive connection) as an error in a callback (3.12 checks ``cancelled()`` first)."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def route_around_proxy(context: BrowserContext, proxy_url: str, api_url: str) -> None:
    """Send every request of ``context`` to ``proxy_url`` straight to ``api_url`` instead,
    except the event streams: the page, its modules, creates, cancels and state reads are not
    cut (a module cut mid-file would break the page, not test it); only the events
    connections (EventSource, and the client's probes of the same URL) cross the proxy."""
    pattern = re.compile("^" + re.escape(proxy_url) + r"/(?!v1/streams/[^/?]+/events)")

    def direct(route: Route) -> None:
        url = api_url + route.request.url[len(proxy_url) :]
        route.fulfill(response=route.fetch(url=url))

    context.route(pattern, direct)


#: How long a page's actions and waits may take before the test fails.
TIMEOUT_MS = 20_000
VIEWPORT = {"width": 1280, "height": 800}

#: The ``open_page`` fixture: ``open_page(proxy=None, api=None, **context_options)``.
OpenPage = Callable[..., tuple[Page, PageLog]]


class Pages:
    """Opens pages, each in a new context (its own sessionStorage), 1280 by 800 and dark
    unless ``context_options`` say otherwise; closes them all on exit. With ``proxy``, the
    requests to the proxy's origin go straight to ``api``, except the event streams
    (``route_around_proxy``)."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.contexts: list[BrowserContext] = []

    def open(
        self,
        *,
        proxy: ThreadedChaosProxy | None = None,
        api: ApiProcess | None = None,
        **context_options: Any,
    ) -> tuple[Page, PageLog]:
        options = {"viewport": VIEWPORT, "color_scheme": "dark", **context_options}
        context = self.browser.new_context(**options)
        context.set_default_timeout(TIMEOUT_MS)
        self.contexts.append(context)
        if proxy is not None:
            assert api is not None
            route_around_proxy(context, proxy.url, api.url)
        page = context.new_page()
        return page, PageLog(page)

    def __enter__(self) -> Pages:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for context in self.contexts:
            context.close()
