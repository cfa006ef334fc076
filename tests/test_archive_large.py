"""A large import does not stall the api process: while a few MiB are imported, ``/healthz``
keeps answering, readers of the stream see it whole or not at all, and it round-trips; a
large file refused at its end leaves nothing behind (infra/bench/import_stall.py measures
the same at 64 MiB). A real api process on the session's redis-server, auth off."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis

from broker import keys
from tests.support import archives
from tests.support.processes import ApiProcess, Launcher
from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

WORDS = ["durable", " logs", " keep", " every", " token", " for", " late", " readers"]
#: Token events in the file: about 4 MiB with their text repeated in the header.
EVENTS = 50_000


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    with Launcher(redis_server.url) as launch:
        yield launch.api()


def large_archive() -> archives.Rows:
    texts = [WORDS[i % len(WORDS)] + str(i % 7) for i in range(EVENTS)]
    return archives.build(texts, progress=False)


@dataclass
class Watcher:
    """Polls ``/healthz`` and the imported stream's state from a thread until stopped."""

    url: str
    stream_id: str
    stop: threading.Event = field(default_factory=threading.Event)
    #: ``(sent, answered)`` of each ``/healthz`` (perf_counter seconds).
    health: list[tuple[float, float]] = field(default_factory=list)
    #: What each state read saw: None (404), or ``(last_event_id, len(text))``.
    states: list[tuple[int, int] | None] = field(default_factory=list)
    error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=60) as client:
                while not self.stop.is_set():
                    sent = time.perf_counter()
                    assert client.get("/healthz").status_code == 200
                    self.health.append((sent, time.perf_counter()))
                    state = client.get(f"/v1/streams/{self.stream_id}")
                    if state.status_code == 404:
                        self.states.append(None)
                    else:
                        assert state.status_code == 200, state.text
                        body = state.json()
                        self.states.append((body["last_event_id"], len(body["text"])))
        except BaseException as exc:
            self.error = exc


def import_while_watching(url: str, rows: archives.Rows) -> tuple[httpx.Response, Watcher, float]:
    content = archives.dumps(rows).encode()
    watcher = Watcher(url, rows[0]["id"])
    thread = threading.Thread(target=watcher.run)
    thread.start()
    try:
        began = time.perf_counter()
        response = httpx.post(
            f"{url}/v1/streams/import",
            content=content,
            headers={"Content-Type": "application/x-ndjson"},
            timeout=120,
        )
        ended = time.perf_counter()
    finally:
        watcher.stop.set()
        thread.join(60)
    assert not thread.is_alive()
    assert watcher.error is None, watcher.error
    during = [(s, a) for s, a in watcher.health if s >= began and a <= ended]
    watcher.health = during
    return response, watcher, ended - began


def test_a_large_import_leaves_the_process_answering_and_appears_whole(api: ApiProcess) -> None:
    """Regression: the import parsed and wrote the whole file in one go, and the process
    answered nothing meanwhile (8 MiB: /healthz stalled 2.4 s)."""
    rows = large_archive()
    size = len(archives.dumps(rows).encode())
    assert size > 3 * 2**20
    response, watcher, duration = import_while_watching(api.url, rows)
    assert response.status_code == 201, response.text

    # The loop kept answering throughout: many answers, and no single one waited for a
    # large part of the import (relative to the import's own duration, so not a timing
    # threshold of this machine: before the fix the longest wait was over half of it).
    assert len(watcher.health) >= 20, (len(watcher.health), duration)
    longest = max(answered - sent for sent, answered in watcher.health)
    assert longest < duration / 4, (longest, duration)

    # Readers saw nothing, then everything: never a part of the stream.
    whole = (len(rows) - 1, len(rows[0]["text"]))
    assert set(watcher.states) <= {None, whole}, set(watcher.states) - {None, whole}

    stream_id = rows[0]["id"]
    with httpx.Client(base_url=api.url, timeout=60) as client:
        state = client.get(f"/v1/streams/{stream_id}").json()
        exported = client.get(f"/v1/streams/{stream_id}/export").text
    assert state["last_event_id"] == len(rows) - 1
    assert state["text"] == rows[0]["text"]
    lines = exported.removesuffix("\n").split("\n")
    assert len(lines) == len(rows)
    assert [json.loads(line) for line in lines[1:]] == rows[1:]


def test_a_large_file_refused_at_its_end_leaves_nothing(
    api: ApiProcess, redis_server: RedisServer
) -> None:
    rows = large_archive()
    rows = archives.changed(rows, len(rows) - 1, "data.usage", "5")  # the very last line
    store = redis.Redis.from_url(redis_server.url)
    try:
        before = generation_keys(store)
        response, watcher, _ = import_while_watching(api.url, rows)
        after = generation_keys(store)
    finally:
        store.close()
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_archive"
    assert f"line {len(rows)}: data.usage" in response.json()["error"]["message"]
    assert after == before  # the staged events are gone too
    assert set(watcher.states) == {None}


def test_an_upload_cut_midway_leaves_nothing(api: ApiProcess, redis_server: RedisServer) -> None:
    """A client that goes away mid-body: the events staged so far are deleted at once (and
    would expire soon if the process died instead)."""
    rows = large_archive()
    body = archives.dumps(rows).encode()
    stream_id = rows[0]["id"]
    store = redis.Redis.from_url(redis_server.url)
    host, port = api.url.removeprefix("http://").split(":")

    def staged() -> list[bytes]:
        return list(store.scan_iter(match=f"sb:{{{stream_id}}}:*", count=1000))

    try:
        with socket.create_connection((host, int(port)), timeout=20) as connection:
            connection.sendall(
                b"POST /v1/streams/import HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-ndjson\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[: len(body) // 2]
            )
            eventually(
                lambda: any(b":import:" in key for key in staged()), what="the import staged"
            )
            for key in staged():  # only staging keys: nothing is in place before the end
                assert b":import:" in key
                assert 0 < store.ttl(key) <= keys.IMPORT_STAGING_SECONDS
        eventually(lambda: not staged(), what="the staged events gone")
    finally:
        store.close()
    with httpx.Client(base_url=api.url, timeout=30) as client:
        assert client.get(f"/v1/streams/{stream_id}").status_code == 404


def generation_keys(store: redis.Redis) -> set[bytes]:
    """Every generation's keys (and an import's staging keys): not the deployment-wide
    ones of the control slot, which ``/readyz`` probes write at any time."""
    return {
        key
        for key in store.scan_iter(match="sb:{*", count=1000)
        if not key.startswith(keys.CONTROL.encode())
    }
