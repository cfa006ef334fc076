"""Export and import with real processes: a stream exported from one broker (its own Redis)
and imported into another is indistinguishable to readers; bad files are refused, naming the
line, and change nothing; with auth on, export needs the key and an import cannot tell
whether another tenant has an id."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import httpx
import pytest
import redis.asyncio as aioredis

from broker.state import is_stream_id, iso_ms, new_stream_id, now_ms
from tests.support import archives
from tests.support.archives import REMOVE
from tests.support.generations import bearer, create
from tests.support.processes import ApiProcess, Launcher
from tests.support.redis_server import RedisServer, running_server
from tests.support.sse import watch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


KEY_A = "archive-key-of-tenant-a-0123"
KEY_B = "archive-key-of-tenant-b-0123"
A = bearer(KEY_A)
B = bearer(KEY_B)
BODY = {"model": "fake", "messages": [{"role": "user", "content": "a secret prompt"}]}


@dataclass
class Brokers:
    source: ApiProcess  # with a worker: where streams are generated
    target: ApiProcess  # another Redis, no worker: where they are imported
    target_redis: str
    guarded: ApiProcess  # auth on (tenants a and b), on the target's Redis


@pytest.fixture(scope="module")
def brokers(redis_server: RedisServer) -> Iterator[Brokers]:
    auth = {
        "BROKER_API_KEYS": f"{KEY_A}:a,{KEY_B}:b",
        "BROKER_READ_TOKEN_SECRETS": "r" * 32,
    }
    with running_server() as other, Launcher(redis_server.url) as launch:
        source = launch.api()
        target = launch.api(redis_url=other.url)
        guarded = launch.api(auth, redis_url=other.url)
        launch.worker()
        yield Brokers(source, target, other.url, guarded)


async def stored_keys(redis_url: str) -> set[bytes]:
    """Every per-generation key (``sb:{<id>}:…``, staging keys included) of a Redis."""
    store = aioredis.Redis.from_url(redis_url)
    try:
        return {key async for key in store.scan_iter(match="sb:{*")}
    finally:
        await store.aclose()


async def export(client: httpx.AsyncClient, base: str, stream_id: str) -> str:
    response = await client.get(f"{base}/v1/streams/{stream_id}/export")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return response.text


async def import_file(
    client: httpx.AsyncClient, base: str, content: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post(
        f"{base}/v1/streams/import",
        content=content.encode(),
        headers={"Content-Type": "application/x-ndjson", **(headers or {})},
    )


async def test_an_exported_stream_imports_indistinguishably(
    brokers: Brokers, client: httpx.AsyncClient
) -> None:
    stream_id = await create(client, brokers.source.url, max_tokens=60, rate=200, seed=9)
    original = await watch(client, brokers.source.url, stream_id)  # to its end
    assert original.ended
    before = (await client.get(f"{brokers.source.url}/v1/streams/{stream_id}")).json()
    exported = await export(client, brokers.source.url, stream_id)

    response = await import_file(client, brokers.target.url, exported)
    assert response.status_code == 201, response.text
    assert response.json()["id"] == stream_id

    imported = await watch(client, brokers.target.url, stream_id)
    assert imported.events == original.events  # same ids, types, data and times
    after = (await client.get(f"{brokers.target.url}/v1/streams/{stream_id}")).json()
    counters = ("connections", "resumes")  # they count this test's own reads
    assert {k: v for k, v in after.items() if k not in counters} == {
        k: v for k, v in before.items() if k not in counters
    }
    # Exported again from its new home, it is the same file (the read counters aside).
    again = await export(client, brokers.target.url, stream_id)
    assert [json.loads(line) for line in again.splitlines()][1:] == [
        json.loads(line) for line in exported.splitlines()
    ][1:]
    # And it can be imported only once.
    twice = await import_file(client, brokers.target.url, exported)
    assert twice.status_code == 409
    assert twice.json()["error"]["code"] == "stream_exists"


def tamper(exported: str, line: int, change: dict[str, object]) -> str:
    rows = exported.splitlines()
    rows[line] = json.dumps({**json.loads(rows[line]), **change})
    return "\n".join(rows)


async def test_bad_files_are_refused_naming_the_problem_and_change_nothing(
    brokers: Brokers, client: httpx.AsyncClient
) -> None:
    stream_id = await create(client, brokers.source.url, max_tokens=10, rate=1000, seed=3)
    await watch(client, brokers.source.url, stream_id)
    good = await export(client, brokers.source.url, stream_id)
    rows = good.splitlines()
    running_id = await create(client, brokers.source.url, max_tokens=500, rate=5, seed=4)
    unfinished = await export(client, brokers.source.url, running_id)
    cases = {
        "": "empty",
        "hello": "line 1",
        tamper(good, 0, {"format": "other"}): "line 1",
        tamper(good, 0, {"version": 2}): "line 1",
        tamper(good, 0, {"id": "nope"}): "line 1: id",
        tamper(good, 2, {"id": 7}): "line 3: id",
        tamper(good, 2, {"event": "party"}): "line 3: event",
        tamper(good, 2, {"t": -4}): "line 3: t",
        tamper(good, 2, {"data": [1]}): "line 3: data",
        "\n".join(rows[:-1]): "finished",
        "\n".join([*rows[:2], rows[-1], *rows[2:-1]]): "line 3",
        unfinished: "finished",
        "\n".join([rows[0], '{"id": 1, "t": NaN}']): "line 2",
    }
    for content, named in cases.items():
        response = await import_file(client, brokers.target.url, content)
        assert response.status_code == 400, (named, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_archive"
        assert named in error["message"], (named, error["message"])
    for refused in (stream_id, running_id):
        gone = await client.get(f"{brokers.target.url}/v1/streams/{refused}")
        assert gone.status_code == 404  # nothing was written


def refusal(response: httpx.Response) -> str:
    """The message of a 400 ``invalid_archive`` (anything else fails the test)."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_archive", error
    message: str = error["message"]
    return message


async def test_event_data_cannot_override_the_events_type_or_time(
    brokers: Brokers, client: httpx.AsyncClient
) -> None:
    """Regression: ``data`` holding ``type`` or ``t`` replaced the frame's own fields in the
    log, so a "completed" stream read back without its ``done`` (readers got pings forever)
    or with a ``done`` in the middle (responses cut mid-body)."""
    rows = archives.build()
    last = len(rows) - 1
    before = await stored_keys(brokers.target_redis)
    cases = {
        "line 2: data.type": archives.changed(rows, 1, "data.type", "done"),
        f"line {last + 1}: data.type": archives.changed(rows, last, "data.type", "token"),
        "line 3: data.t": archives.changed(rows, 2, "data.t", 99),
    }
    for named, bad in cases.items():
        message = refusal(await import_file(client, brokers.target.url, archives.dumps(bad)))
        assert named in message, (named, message)
    assert await stored_keys(brokers.target_redis) == before
    gone = await client.get(f"{brokers.target.url}/v1/streams/{rows[0]['id']}")
    assert gone.status_code == 404


#: A completed stream's header (line 1), ill-typed or inconsistent: (field, value).
BAD_HEADERS = [
    ("meta.usage", "5"),
    ("meta.usage", '{"prompt_tokens":3,"completion_tokens":"5","total_tokens":8}'),
    ("meta.usage", "{"),
    ("meta.metadata", "[1]"),
    ("meta.request", "5"),
    ("meta.created_at_ms", "1e3"),
    ("meta.created_at_ms", REMOVE),
    ("meta.started_at_ms", " 5"),
    ("meta.started_at_ms", "05"),
    ("meta.finished_at_ms", "\u0665"),  # an Arabic-Indic digit: int() takes it, Lua does not
    ("meta.finished_at_ms", "999999999999999999"),  # past year 9999: no RFC 3339 time
    ("meta.connections", "-1"),
    ("meta.connections", str(2**63 - 1)),  # a reader's HINCRBY would overflow: events 500
    ("meta.attempt", "1.0"),
    ("meta.error", '"boom"'),  # a completed stream has no error
    ("meta.status", "failed"),  # its last event is done/stop
    ("meta.status", "running"),
    ("meta.finish_reason", "length"),
    ("meta.last_seq", "3"),
    ("meta.cancel_requested", "yes"),
    ("meta.imported_from", "not-an-id"),
    ("meta.surprise", "x"),
    ("meta.model", REMOVE),
    ("text", "Hello, there"),
    ("text", "Hello, world and more"),
    ("surprise", 1),
]
#: The events of a completed stream with a tool call, ill-typed, missing or unknown:
#: (row, field, value); rows 1 to 3 are the metadata, a token and a progress, -2 the tool
#: call and -1 the ``done``.
BAD_EVENTS = [
    (1, "data.id", "0" * 26),
    (1, "data.attempt", 1.5),
    (1, "data.metadata", "x"),
    (2, "data.tokens", "3"),
    (2, "data.tokens", True),
    (2, "data.text", 5),
    (2, "data.text", REMOVE),
    (2, "data.extra", 1),
    (2, "t", 1.5),
    (2, "surprise", 1),
    (3, "data.tokens_per_second", "1"),
    (3, "data.eta_ms", -1),
    (-2, "data.index", "0"),
    (-2, "data.name", 7),
    (-1, "data.usage", "5"),
    (-1, "data.usage", REMOVE),
    (-1, "data.usage", {"total_tokens": 2.5}),
    (-1, "data.finish_reason", None),
]
#: A failed stream's ``error`` event ill-typed (-1), or a header (0) that does not say it
#: failed: (row, field, value).
BAD_FAILED_STREAMS = [
    (-1, "data.retryable", "yes"),
    (-1, "data.code", 5),
    (0, "meta.error", "{}"),
    (0, "meta.status", "completed"),
]


def bad_file(rows: archives.Rows, row: int, field: str, value: object) -> tuple[str, archives.Rows]:
    """``rows`` with ``field`` of row ``row`` (negative: from the end) set to ``value``, and
    what the refusal must name: ``line <n>: <field>``, lines counted from 1."""
    index = row % len(rows)
    return f"line {index + 1}: {field}", archives.changed(rows, index, field, value)


async def test_ill_typed_or_inconsistent_files_are_refused_and_the_listing_stays_up(
    brokers: Brokers, client: httpx.AsyncClient
) -> None:
    """Regression: meta and payloads of the wrong type (``usage: "5"``) were stored, and the
    state and the tenant's whole listing answered 500 until they expired."""
    rows = archives.build(tool_call=True)
    failed = archives.build(end="error")
    cases = [bad_file(rows, 0, field, value) for field, value in BAD_HEADERS]
    cases += [bad_file(rows, row, field, value) for row, field, value in BAD_EVENTS]
    cases += [bad_file(failed, row, field, value) for row, field, value in BAD_FAILED_STREAMS]
    before = await stored_keys(brokers.target_redis)
    for named, bad in cases:
        message = refusal(await import_file(client, brokers.target.url, archives.dumps(bad)))
        assert named in message, (named, message)
    assert await stored_keys(brokers.target_redis) == before
    listing = await client.get(f"{brokers.target.url}/v1/streams")
    assert listing.status_code == 200, listing.text
    # The same files unchanged are accepted, and served.
    for good in (rows, failed):
        response = await import_file(client, brokers.target.url, archives.dumps(good))
        assert response.status_code == 201, response.text
        state = await client.get(f"{brokers.target.url}/v1/streams/{good[0]['id']}")
        assert state.status_code == 200, state.text
        assert state.json()["text"] == good[0]["text"]
    assert (await client.get(f"{brokers.target.url}/v1/streams")).status_code == 200


async def test_a_read_token_reads_state_and_events_but_cannot_export(
    brokers: Brokers, client: httpx.AsyncClient
) -> None:
    """Regression: a read token could export its stream, and so read the stored request
    (system prompt, messages), the tenant and the worker's host."""
    base = brokers.guarded.url
    created = await client.post(f"{base}/v1/streams", json=BODY, headers=A)
    assert created.status_code == 201, created.text
    stream_id, token = created.json()["id"], created.json()["read_token"]

    refused = await client.get(f"{base}/v1/streams/{stream_id}/export", params={"token": token})
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["code"] == "unauthorized"
    assert "a secret prompt" not in refused.text
    assert refused.headers["www-authenticate"].startswith("Bearer")
    state = await client.get(f"{base}/v1/streams/{stream_id}", params={"token": token})
    assert state.status_code == 200, state.text
    assert "a secret prompt" not in state.text

    exported = await client.get(f"{base}/v1/streams/{stream_id}/export", headers=A)
    assert exported.status_code == 200, exported.text
    assert json.loads(exported.text.splitlines()[0])["id"] == stream_id
    other = await client.get(f"{base}/v1/streams/{stream_id}/export", headers=B)
    assert other.status_code == 404


async def test_under_auth_an_import_gets_a_new_id_whoever_has_the_files_id(
    brokers: Brokers, client: httpx.AsyncClient
) -> None:
    """Regression: tenant B importing a file with tenant A's id got 409 where a GET of the id
    answers 404, an oracle of A's ids. Now every import under auth gets a new id (the file's
    is kept as ``imported_from``), so a known and an unknown id answer alike."""
    base = brokers.guarded.url
    created = await client.post(f"{base}/v1/streams", json=BODY, headers=A)
    assert created.status_code == 201, created.text
    theirs = created.json()["id"]
    before = (await client.get(f"{base}/v1/streams/{theirs}", headers=A)).json()
    created_at = now_ms() - 60_000
    unknown = new_stream_id(created_at)

    imported: dict[str, str] = {}
    for file_id in (theirs, unknown):
        rows = archives.build(stream_id=file_id, created_at_ms=created_at, tenant="a")
        response = await import_file(client, base, archives.dumps(rows), B)
        assert response.status_code == 201, response.text
        answer = response.json()
        assert set(answer) == {"id", "url", "events_url"}
        new_id = answer["id"]
        assert is_stream_id(new_id)
        assert new_id != file_id
        assert new_id[:10] == new_stream_id(created_at)[:10]  # sorts as the original did
        assert response.headers["location"] == answer["url"] == f"/v1/streams/{new_id}"
        imported[file_id] = new_id

        state = (await client.get(f"{base}/v1/streams/{new_id}", headers=B)).json()
        assert state["id"] == new_id
        assert state["tenant"] == "b"  # the importer's, whatever the file says
        assert state["imported_from"] == file_id
        assert state["text"] == rows[0]["text"]
        assert state["created_at"] == iso_ms(created_at)
        with anyio.fail_after(20):  # a finished stream's events end by themselves
            events = (await client.get(f"{base}/v1/streams/{new_id}/events", headers=B)).text
        assert f'"id":"{new_id}"' in events  # the metadata event names the stream's own id
        assert file_id not in events
        hidden = await client.get(f"{base}/v1/streams/{new_id}", headers=A)
        assert hidden.status_code == 404

    after = (await client.get(f"{base}/v1/streams/{theirs}", headers=A)).json()
    assert after == before  # A's stream is untouched
    listed_a = (await client.get(f"{base}/v1/streams", headers=A)).json()["data"]
    listed_b = (await client.get(f"{base}/v1/streams", headers=B)).json()["data"]
    assert not {row["id"] for row in listed_a} & set(imported.values())
    assert set(imported.values()) <= {row["id"] for row in listed_b}
    assert before["imported_from"] is None  # a stream of its own


async def test_without_auth_an_import_keeps_its_id_and_an_id_in_use_is_409(
    brokers: Brokers, client: httpx.AsyncClient
) -> None:
    rows = archives.build()
    first = await import_file(client, brokers.target.url, archives.dumps(rows))
    assert first.status_code == 201, first.text
    assert first.json()["id"] == rows[0]["id"]
    state = (await client.get(f"{brokers.target.url}/v1/streams/{rows[0]['id']}")).json()
    assert state["imported_from"] is None
    again = await import_file(client, brokers.target.url, archives.dumps(rows))
    assert again.status_code == 409, again.text
    assert again.json()["error"]["code"] == "stream_exists"


async def test_a_text_with_line_separators_round_trips(
    brokers: Brokers, client: httpx.AsyncClient
) -> None:
    """Export writes U+2028 and friends raw (``ensure_ascii=False``); the import split lines
    with ``str.splitlines``, which also breaks there, and refused its own exports."""
    rows = archives.build(["one\u2028two", "\u2029three\x85", "\x0bfour\x1c\r"])
    response = await import_file(client, brokers.target.url, archives.dumps(rows))
    assert response.status_code == 201, response.text
    exported = await export(client, brokers.target.url, rows[0]["id"])
    header = json.loads(exported.split("\n")[0])
    assert header["text"] == rows[0]["text"]
