"""The operator console and the browser client, served by the api itself.

``/console`` is one static page (``api/static/console/index.html``) whose ES modules are
under ``/static/``, next to ``/static/streambroker.js``, the dependency-free browser client
that the console (and any web page) watches streams with. No build step, no CDN: what is in
``api/static`` is what the browser runs.

These paths are outside ``/v1`` and need no key: they are code, not data. Everything the
console shows comes from the authenticated API, with the key the operator types in (kept in
the tab's ``sessionStorage``) or a read token from the page's URL.

Headers: the page gets a strict Content-Security-Policy (scripts and styles from this origin
only, nothing inline, connections only to this origin), so a stream's text, which is
untrusted model output, can never run as code even if a rendering bug slipped it into
markup. ``Referrer-Policy: no-referrer`` keeps a read token in the page's URL from leaking.
Everything is ``Cache-Control: no-cache``: browsers revalidate on every load (a static file
whose ``ETag`` still matches answers 304), so after a deploy no stale module is mixed with
new ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX = STATIC_DIR / "console" / "index.html"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

_COMMON_HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}

#: Set explicitly: ``mimetypes`` depends on the host's ``/etc/mime.types`` and, on some
#: systems, answers ``application/javascript`` or ``text/plain`` for ``.js``; a module script
#: served with a wrong type is refused by the browser (and ``nosniff`` makes that strict).
_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}


class StaticAssets(StaticFiles):
    """``StaticFiles`` with fixed content types and the console's caching headers."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        media_type = _MEDIA_TYPES.get(Path(full_path).suffix.lower())
        if media_type is not None and response.status_code != 304:
            response.headers["content-type"] = media_type
        response.headers.update(_COMMON_HEADERS)
        return response


def html_page(path: Path) -> Response:
    """A page of ``api/static`` with the strict policy; the demo page at ``/`` uses it too."""
    return FileResponse(
        path,
        media_type="text/html; charset=utf-8",
        headers={**_COMMON_HEADERS, "content-security-policy": CONTENT_SECURITY_POLICY},
    )


async def console_page(request: Request) -> Response:
    return html_page(INDEX)


routes = [
    Route("/console", console_page, methods=["GET"]),
    Route("/console/", console_page, methods=["GET"]),
    Mount("/static", app=StaticAssets(directory=STATIC_DIR), name="static"),
]
