"""Export and import with real processes: a stream exported from one broker (its own Redis)
and imported into another is indistinguishable to readers; bad files are refused, naming the
line, and change nothing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support.generations import create
from tests.support.processes import ApiProcess, BrokerProcess, start_worker, stop_all
from tests.support.redis_server import RedisServer
from tests.support.sse import watch

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


@dataclass
class Brokers:
    source: ApiProcess  # with a worker: where streams are generated
    target: ApiProcess  # another Redis, no worker: where they are imported


@pytest.fixture(scope="module")
def brokers(redis_server: RedisServer) -> Iterator[Brokers]:
    binary = shutil.which("redis-server")
    assert binary is not None
    other = RedisServer(binary)
    other.start()
    started: list[BrokerProcess] = []
    try:
        source = ApiProcess(redis_server.url).start()
        target = ApiProcess(other.url).start()
        started += [source, target, start_worker(redis_server.url)]
        yield Brokers(source, target)
    finally:
        stop_all(started)
        other.stop()


async def export(client: httpx.AsyncClient, base: str, stream_id: str) -> str:
    response = await client.get(f"{base}/v1/streams/{stream_id}/export")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return response.text


async def import_file(client: httpx.AsyncClient, base: str, content: str) -> httpx.Response:
    return await client.post(
        f"{base}/v1/streams/import",
        content=content.encode(),
        headers={"Content-Type": "application/x-ndjson"},
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
