"""Fuzzing the import: whatever archive a client sends, the broker either refuses it (400
``invalid_archive``, nothing stored) or serves it correctly everywhere a reader looks: its
state, the tenant's listing, its events (also as OpenAI chunks) and its export. Hypothesis
builds finished streams as a worker writes them and mutates some of their fields and lines.
A real api process (auth on: every import gets a new id) on the session's redis-server;
every read is bounded, so a stream that never ends fails the example instead of hanging.
Sized to run in seconds; HYPOTHESIS_PROFILE=long runs more."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from hypothesis import event, given
from hypothesis import strategies as st

from broker.state import iso_ms
from tests.support import archives, fuzzing
from tests.support.fuzzing import FUZZ
from tests.support.generations import bearer
from tests.support.processes import ApiProcess, Launcher
from tests.support.redis_server import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.e2e]

KEY = "key-of-the-archive-fuzzing-tenant"
AUTH = bearer(KEY)
#: Longest a stream's events may take to come: they are all recorded already.
READ_SECONDS = 10.0

META_FIELDS = [
    "id", "model", "status", "created_at_ms", "request", "tenant", "metadata", "attempt",
    "last_seq", "worker", "lease_until_ms", "started_at_ms", "first_token_at_ms",
    "finished_at_ms", "finish_reason", "usage", "error", "cancel_requested", "lost_from_seq",
    "connections", "resumes", "imported_from", "last_batch", "surprise",
]  # fmt: skip
DATA_FIELDS = [
    "type", "t", "id", "model", "created_at", "attempt", "metadata", "text", "tokens",
    "index", "name", "arguments", "tokens_per_second", "estimated_total", "percent", "eta_ms",
    "code", "message", "retryable", "retry_after", "finish_reason", "usage", "surprise",
]  # fmt: skip
HEADER_PATHS = ["format", "version", "id", "text", "meta", "surprise"] + [
    f"meta.{name}" for name in META_FIELDS
]
EVENT_PATHS = ["id", "event", "t", "data", "surprise"] + [f"data.{name}" for name in DATA_FIELDS]

json_values = fuzzing.json_values(
    finite=True, int64=True, text=20, items=3, key=8, entries=3, leaves=8
)
#: Values that look almost right: numbers as text of every wrong kind, JSON in strings.
near_misses = st.sampled_from(
    [
        "5", " 5", "05", "1e3", "-1", "1.0", "\u0665", "999999999999999999", "", "null",
        str(2**63 - 1), str(2**63), "253402300799999", "253402300800000",
        "[1]", '"x"', "{}", '{"prompt_tokens":1}', '{"code":"x","message":"y"}', "completed",
        "failed", "cancelled", "running", "stop", "1", "0", "0" * 26, 0, 1, -1, 2**63 - 1,
        1.5, True, None, {}, [], {"prompt_tokens": 1}, "token", "done", "error",
    ]
)  # fmt: skip
values = st.one_of(near_misses, near_misses, json_values, st.just(archives.REMOVE))
line_change = st.sampled_from(["drop", "duplicate", "swap", "truncate"])


@st.composite
def archives_to_send(draw: st.DrawFn) -> tuple[archives.Rows, bool]:
    """``(rows, mutated)``: a finished stream, maybe with fields or lines changed."""
    texts = draw(st.lists(st.text(max_size=12), max_size=5))
    rows = archives.build(
        texts,
        end=draw(st.sampled_from(["stop", "length", "cancelled", "error"])),
        progress=draw(st.booleans()),
        tool_call=draw(st.booleans()),
    )
    mutated = False
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        mutated = True
        line = draw(st.integers(min_value=0, max_value=len(rows) - 1))
        if draw(st.booleans()):
            paths = HEADER_PATHS if line == 0 else EVENT_PATHS
            path = draw(st.sampled_from(paths))
            parent = rows[line]
            for part in path.split(".")[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if not isinstance(parent, dict):
                continue
            rows = archives.changed(rows, line, path, draw(values))
        else:
            change = draw(line_change)
            other = draw(st.integers(min_value=0, max_value=len(rows) - 1))
            if change == "drop" and len(rows) > 1:
                rows = rows[:line] + rows[line + 1 :]
            elif change == "duplicate":
                rows = rows[: line + 1] + rows[line:]
            elif change == "swap":
                rows = list(rows)
                rows[line], rows[other] = rows[other], rows[line]
            elif change == "truncate":
                rows = rows[: line + 1]
    return rows, mutated


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[ApiProcess]:
    env = {
        "BROKER_API_KEYS": f"{KEY}:fuzz",
        "BROKER_READ_TOKEN_SECRETS": "f" * 32,
        # A stream that never ends still sends pings: each read checks its deadline.
        "BROKER_HEARTBEAT_SECONDS": "0.2",
    }
    with Launcher(redis_server.url) as launch:
        # On an emptied store: each example compares the store's generation keys before and
        # after, which keys another module left (expiring meanwhile) must not disturb.
        launch.flush()
        yield launch.api(env)


@pytest.fixture(scope="module")
def http(api: ApiProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, headers=AUTH, timeout=READ_SECONDS) as client:
        yield client


@pytest.fixture(scope="module")
def store(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def generation_keys(store: redis.Redis) -> set[bytes]:
    """Every per-generation key, staging keys included (they share the ``{id}`` tag)."""
    return set(store.scan_iter(match="sb:{*", count=1000))


def read_to_end(http: httpx.Client, url: str, **params: str) -> str:
    """A whole event stream, which must end by itself within ``READ_SECONDS``."""
    deadline = time.monotonic() + READ_SECONDS
    body = bytearray()
    with http.stream("GET", url, params=params) as response:
        assert response.status_code == 200, response.read()
        for chunk in response.iter_bytes():
            body += chunk
            assert time.monotonic() < deadline, f"{url} did not end: {bytes(body[-300:])!r}"
    return body.decode()


def frames(body: str) -> list[dict[str, str]]:
    """SSE blocks as ``{field: value}`` (comments and the ``retry:`` block left out)."""
    found = []
    for block in body.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.split("\n") if ": " in line and line[0] != ":"
        )
        if "data" in fields:
            found.append(fields)
    return found


def expected_events(rows: archives.Rows, new_id: str) -> list[dict[str, Any]]:
    """The file's events as readers get them: ``t`` inside ``data``, and the metadata
    event naming the stream's new id."""
    expected = []
    for row in rows[1:]:
        data = dict(row["data"])
        if row["event"] == "metadata":
            data["id"] = new_id
        expected.append({"id": row["id"], "event": row["event"], "data": {**data, "t": row["t"]}})
    return expected


def assert_served(http: httpx.Client, rows: archives.Rows, new_id: str) -> None:
    """An imported archive, everywhere a reader looks: its state, the tenant's listing, its
    events (the broker's and OpenAI's) and its export."""
    assert_state(http, rows, new_id)
    assert_listed(http, rows, new_id)
    assert_events(http, rows, new_id)
    assert_exported(http, rows, new_id)


def assert_state(http: httpx.Client, rows: archives.Rows, new_id: str) -> None:
    """The state: the new id, the status its terminal event says, the importing tenant, where
    it came from, its last event, its text, and its usage and finish reason or its error."""
    header, events = rows[0], rows[1:]
    terminal = events[-1]
    if terminal["event"] == "error":
        status = "failed"
    elif terminal["data"]["finish_reason"] == "cancelled":
        status = "cancelled"
    else:
        status = "completed"

    state = http.get(f"/v1/streams/{new_id}")
    assert state.status_code == 200, state.text
    body = state.json()
    assert body["id"] == new_id
    assert body["status"] == status
    assert body["tenant"] == "fuzz"
    assert body["imported_from"] == header["id"]
    assert body["last_event_id"] == len(events)
    tokens = [e["data"]["text"] for e in events if e["event"] == "token"]
    assert body["text"] == header["text"] == "".join(tokens)
    if terminal["event"] == "done":
        assert body["usage"] == terminal["data"]["usage"]
        assert body["finish_reason"] == (terminal["data"]["finish_reason"] or None)
    else:
        assert body["error"] == terminal["data"]


def assert_listed(http: httpx.Client, rows: archives.Rows, new_id: str) -> None:
    """The tenant's listing answers, whole and in the window of the stream's creation time,
    and the latter lists the stream."""
    created = int(rows[0]["meta"]["created_at_ms"])
    window = {"created_after": iso_ms(created), "created_before": iso_ms(created + 1)}
    for params in ({"limit": "200"}, {**window, "limit": "200"}):
        listing = http.get("/v1/streams", params=params)
        assert listing.status_code == 200, listing.text
    assert new_id in {row["id"] for row in listing.json()["data"]}


def assert_events(http: httpx.Client, rows: archives.Rows, new_id: str) -> None:
    """The events, which end by themselves: the file's, as readers get them; as OpenAI chunks,
    the text then ``[DONE]``, or an error last."""
    header, terminal = rows[0], rows[-1]
    served = frames(read_to_end(http, f"/v1/streams/{new_id}/events"))
    got = [{"id": int(f["id"]), "event": f["event"], "data": json.loads(f["data"])} for f in served]
    assert got == expected_events(rows, new_id)

    openai = frames(read_to_end(http, f"/v1/streams/{new_id}/events", format="openai"))
    assert openai, "no OpenAI chunks"
    if terminal["event"] == "done":
        assert openai[-1]["data"] == "[DONE]"
        content = "".join(
            json.loads(f["data"])["choices"][0]["delta"].get("content") or ""
            for f in openai[:-1]
            if json.loads(f["data"]).get("choices")
        )
        assert content == header["text"]
    else:
        assert "error" in json.loads(openai[-1]["data"])


def assert_exported(http: httpx.Client, rows: archives.Rows, new_id: str) -> None:
    """The export: the file sent, under the new id, of the importing tenant, saying where it
    came from (the read counters aside)."""
    header = rows[0]
    exported = http.get(f"/v1/streams/{new_id}/export")
    assert exported.status_code == 200, exported.text
    # Only "\n" ends a line: the text may hold U+2028 and the like, raw.
    lines = [json.loads(line) for line in exported.text.removesuffix("\n").split("\n")]
    assert lines[0]["id"] == new_id
    assert lines[0]["text"] == header["text"]
    counters = ("connections", "resumes")  # they count this test's own reads
    assert {k: v for k, v in lines[0]["meta"].items() if k not in counters} == {
        k: v
        for k, v in {
            **header["meta"],
            "id": new_id,
            "tenant": "fuzz",
            "imported_from": header["id"],
        }.items()
        if k not in counters
    }
    assert [{**line, "data": {**line["data"], "t": line["t"]}} for line in lines[1:]] == [
        {**e, "t": e["data"]["t"]} for e in expected_events(rows, new_id)
    ]


@FUZZ
@given(sent=archives_to_send(), blank=st.booleans())
def test_every_archive_is_refused_cleanly_or_served_consistently(
    http: httpx.Client, store: redis.Redis, sent: tuple[archives.Rows, bool], blank: bool
) -> None:
    rows, mutated = sent
    content = archives.dumps(rows) + ("\n" if blank else "")
    before = generation_keys(store)
    response = http.post(
        "/v1/streams/import",
        content=content.encode(),
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert response.status_code in (201, 400), response.text
    event(f"{'mutated' if mutated else 'as written'}: {response.status_code}")
    if response.status_code == 400:
        assert mutated, f"a well-formed archive was refused: {response.text}"
        assert response.json()["error"]["code"] == "invalid_archive"
        assert generation_keys(store) == before  # nothing stored, no staging left behind
        return
    new_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/streams/{new_id}"
    assert_served(http, rows, new_id)
