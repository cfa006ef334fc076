"""Serving the operator console and the browser client (``api/console.py``), and read tokens
for existing streams (``api/read_tokens.py``), through the real app in-process on the
session's redis-server. The console itself runs in Chromium in ``test_console.py``."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from api.console import CONTENT_SECURITY_POLICY, STATIC_DIR
from broker import read_token_signing
from tests.support.generations import bearer, create_stream
from tests.support.processes import Launcher

pytestmark = pytest.mark.redis

KEY_A = "key-of-tenant-a-0123456789"
KEY_B = "key-of-tenant-b-0123456789"
SECRET = "s" * 32
UNKNOWN_ID = "01m7zg35f6ys8701yg1hhg2w5d"


@pytest.fixture
def auth_client(launch: Launcher) -> TestClient:
    return launch.app(
        {
            "BROKER_API_KEYS": f"{KEY_A}:tenant-a,{KEY_B}:tenant-b",
            "BROKER_READ_TOKEN_SECRETS": SECRET,
            "BROKER_READ_TOKEN_SECONDS": "600",
        }
    )


# ------------------------------------------------------------------------- read tokens


def test_a_key_gets_a_read_token_for_its_tenants_stream(auth_client: TestClient) -> None:
    stream_id = create_stream(auth_client, key=KEY_A)["id"]
    before = time.time()
    response = auth_client.post(f"/v1/streams/{stream_id}/read_token", headers=bearer(KEY_A))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"read_token", "expires_at"}
    assert read_token_signing.verify([SECRET], answer["read_token"], now=time.time()) == stream_id
    expires = int(answer["read_token"].split(".")[1])
    assert before + 600 - 1 <= expires <= time.time() + 600
    assert answer["expires_at"] == time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(expires))
    # It reads the stream, without the key.
    state = auth_client.get(f"/v1/streams/{stream_id}", params={"token": answer["read_token"]})
    assert state.status_code == 200
    assert state.json()["id"] == stream_id


def test_another_tenants_stream_answers_404_like_a_missing_one(auth_client: TestClient) -> None:
    stream_id = create_stream(auth_client, key=KEY_A)["id"]
    other = auth_client.post(f"/v1/streams/{stream_id}/read_token", headers=bearer(KEY_B))
    missing = auth_client.post(f"/v1/streams/{UNKNOWN_ID}/read_token", headers=bearer(KEY_B))
    malformed = auth_client.post("/v1/streams/not-an-id/read_token", headers=bearer(KEY_B))
    for response in (other, missing, malformed):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "stream_not_found"


def test_a_read_token_cannot_mint_another_and_no_key_is_401(auth_client: TestClient) -> None:
    stream_id = create_stream(auth_client, key=KEY_A)["id"]
    token = auth_client.post(f"/v1/streams/{stream_id}/read_token", headers=bearer(KEY_A)).json()[
        "read_token"
    ]
    url = f"/v1/streams/{stream_id}/read_token"
    for response in (
        auth_client.post(url, params={"token": token}),
        auth_client.post(url),
        auth_client.post(url, headers=bearer("not-a-key-of-anyone-at-all")),
    ):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_with_auth_off_no_token_is_needed(launch: Launcher) -> None:
    open_client = launch.app()
    stream_id = create_stream(open_client)["id"]
    response = open_client.post(f"/v1/streams/{stream_id}/read_token")
    assert response.status_code == 200
    assert response.json() == {"read_token": None, "expires_at": None}
    assert open_client.post(f"/v1/streams/{UNKNOWN_ID}/read_token").status_code == 404
    wrong = open_client.get(f"/v1/streams/{stream_id}/read_token")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


# ----------------------------------------------------------------------------- serving


@pytest.mark.parametrize("path", ["/console", "/console/"])
def test_the_console_page_is_served_without_a_key_with_a_strict_policy(
    auth_client: TestClient, path: str
) -> None:
    response = auth_client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    policy = dict(part.split(" ", 1) for part in CONTENT_SECURITY_POLICY.split("; "))
    assert policy["script-src"] == "'self'"
    assert policy["default-src"] == "'none'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_the_demo_page_is_served_at_the_root_with_the_same_policy(
    auth_client: TestClient,
) -> None:
    response = auth_client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["referrer-policy"] == "no-referrer"  # a read token in its URL
    assert response.content == (STATIC_DIR / "demo" / "index.html").read_bytes()


PAGES = [STATIC_DIR / "console" / "index.html", STATIC_DIR / "demo" / "index.html"]


@pytest.mark.parametrize("page", PAGES, ids=["console", "demo"])
def test_the_page_has_no_inline_script_or_style(page: Path) -> None:
    html = page.read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts
    assert all('src="' in attrs and not body.strip() for attrs, body in scripts)
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers either


EXPECTED_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
}


def static_files() -> list[Path]:
    return sorted(p for p in STATIC_DIR.rglob("*") if p.is_file())


def test_every_static_file_is_served_with_its_type_and_no_key(auth_client: TestClient) -> None:
    files = static_files()
    assert STATIC_DIR / "streambroker.js" in files
    for path in files:
        url = "/static/" + path.relative_to(STATIC_DIR).as_posix()
        response = auth_client.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"] == EXPECTED_TYPES[path.suffix], url
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == path.read_bytes()
        # Revalidation is cheap: the ETag answers 304.
        again = auth_client.get(url, headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304, url


def test_every_reference_between_the_files_resolves() -> None:
    """A module graph with a wrong path fails only in a browser; catch it here too."""
    references = [
        (page, ref)
        for page in PAGES
        for ref in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.read_text())
    ]
    for module in STATIC_DIR.rglob("*.js"):
        imports = re.findall(
            r'^(?:import|export)\b[^;]*?from\s+"([^"]+)"', module.read_text(), re.M
        )
        references += [(module, ref) for ref in imports]
    assert len(references) > 10
    for source, ref in references:
        target = (
            STATIC_DIR / ref.removeprefix("/static/")
            if ref.startswith("/static/")
            else source.parent / ref
        )
        assert target.resolve().is_file(), f"{source.name}: {ref}"


@pytest.mark.parametrize(
    "path", ["/static/nope.js", "/static/../app.py", "/static/%2e%2e/app.py", "/static/"]
)
def test_unknown_static_paths_answer_404_in_the_error_shape(
    auth_client: TestClient, path: str
) -> None:
    response = auth_client.get(path)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
