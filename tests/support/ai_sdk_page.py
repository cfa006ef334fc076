"""The AI SDK chat page (``tests/clients/node/chat-page/``) for the browser tests: bundled
with esbuild from the pinned ``ai`` package (``tests/clients/node/node_modules``, installed
by ``npm ci``) into a temporary directory, and served by Playwright on the broker's origin
(under ``/chat-test/``), so that its relative ``/v1/streams`` URLs reach the broker with no
CORS and no change to the api. Nothing is built into the source tree; nothing comes from a CDN.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest
from playwright.sync_api import Page, Route

from tests.support.processes import ROOT

NODE_DIR = ROOT / "tests" / "clients" / "node"
PAGE_DIR = NODE_DIR / "chat-page"
ESBUILD = NODE_DIR / "node_modules" / ".bin" / "esbuild"
AI_PACKAGE = NODE_DIR / "node_modules" / "ai" / "package.json"
#: Where the page is served, on the origin of the api (or of a proxy in front of it).
PAGE_PATH = "/chat-test/"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def require_node_modules() -> None:
    """The npm packages; without them, skip locally but fail under CI (as ``chromium_path``)."""
    if ESBUILD.exists() and AI_PACKAGE.exists():
        return
    message = f"the npm packages are not installed (cd {NODE_DIR.relative_to(ROOT)} && npm ci)"
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; the browser tests must not be skipped under CI")
    pytest.skip(message)


def build_chat_page(out_dir: Path) -> dict[str, bytes]:
    """``index.html`` and ``main.js`` bundled with ``ai`` (ES module, for browsers): the
    files to serve, by name."""
    require_node_modules()
    result = subprocess.run(
        [
            str(ESBUILD),
            str(PAGE_DIR / "main.js"),
            "--bundle",
            "--format=esm",
            "--platform=browser",
            f"--outfile={out_dir / 'main.js'}",
            "--log-level=warning",
        ],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"esbuild failed:\n{result.stdout}{result.stderr}"
    assert result.stderr == "", f"esbuild warned:\n{result.stderr}"
    return {
        "index.html": (PAGE_DIR / "index.html").read_bytes(),
        "main.js": (out_dir / "main.js").read_bytes(),
    }


def serve_chat_page(page: Page, origin: str, files: dict[str, bytes]) -> None:
    """Answer ``<origin>/chat-test/<name>`` from ``files`` (404 for anything else there).
    A page's routes come before its context's (``route_around_proxy``)."""
    prefix = origin + PAGE_PATH

    def fulfill(route: Route) -> None:
        name = route.request.url[len(prefix) :].split("?", 1)[0]
        body = files.get(name)
        if body is None:
            route.fulfill(status=404, body=b"not found")
            return
        content_type = CONTENT_TYPES[Path(name).suffix]
        route.fulfill(status=200, body=body, headers={"content-type": content_type})

    page.route(re.compile("^" + re.escape(prefix)), fulfill)


class Budgets(random.Random):
    """A ``ChaosProxy``'s source of byte budgets (``proxy.random``) that gives these budgets to
    its first connections, in order, then never cuts: a network that drops a given number of
    connections at given bytes, then recovers. (A client that resumes with a full replay can
    only get past a cut if a later connection carries more than the bytes before it.)"""

    NEVER = 1 << 40

    def __init__(self, budgets: Iterable[int]) -> None:
        super().__init__(0)
        self.budgets = list(budgets)

    def randint(self, a: int, b: int) -> int:
        return self.budgets.pop(0) if self.budgets else self.NEVER
