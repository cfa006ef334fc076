"""The chat demo at ``/``: a prompt box and the answer streaming through the broker.

One static page (``api/static/demo/index.html`` with ``demo.js`` and ``demo.css``) built
on ``/static/streambroker.js``, the browser client any page can use; served like the
operator console (``api/console.py``: the same strict Content-Security-Policy, nothing
inline, no key needed for the page itself). ``/?watch=<id>&token=<read token>`` opens the
same page read-only on one stream, which is how its "watch in another tab" link shows a
live answer broadcast to several readers.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.console import STATIC_DIR, html_page

INDEX = STATIC_DIR / "demo" / "index.html"


async def demo_page(request: Request) -> Response:
    return html_page(INDEX)


routes = [Route("/", demo_page, methods=["GET"])]
