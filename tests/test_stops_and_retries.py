"""Stops and retries at their edges, each once a defect found against real processes:

- a second SIGTERM to ``api --workers 2`` cuts its drain short, as for one process;
- a worker told to stop while Redis hangs, or is down, or just as it starts, still exits,
  and cleanly;
- a client that read its replayed stream to the end may open the next at once (its
  connection slot is back before the end is written);
- an idempotent retry matches whatever JSON spelling its numbers have (``1`` and ``1.0``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests.support.generations import create_request
from tests.support.processes import (
    ApiProcess,
    ApiProcessWith,
    BrokerProcess,
    Launcher,
    WorkerWithEndpoint,
)
from tests.support.redis_server import RedisServer, running_server
from tests.support.waiting import eventually_async

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


@contextlib.contextmanager
def _reaping_children_of(api: ApiProcess) -> Iterator[list[int]]:
    """The uvicorn children of ``api`` (``--workers N``), SIGKILLed after the test: the
    launcher only stops the parent, and a SIGKILLed parent leaves its children behind."""
    assert api.process is not None
    children = _children(api.process.pid)
    try:
        yield children
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


async def _draining(client: httpx.AsyncClient, base: str) -> bool:
    try:
        response = await client.get(f"{base}/readyz")
    except httpx.TransportError:
        return False
    return response.status_code == 503 and response.json() == {"status": "draining"}


# -- 3. api drain ------------------------------------------------------------------------


async def test_with_workers_a_second_sigterm_to_the_parent_cuts_the_drain_short(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    """docs/configuration.md: "A second SIGTERM or SIGINT during the wait skips what is left
    of it", and "With --workers N every uvicorn process drains; send the signal to the
    parent". With ``--workers 2`` the first SIGTERM to the parent does start every child's
    drain (uvicorn's supervisor forwards one SIGTERM to each child), but the supervisor is
    then blocked in ``join_all()`` and never handles, nor forwards, a second one: the
    process keeps draining for the whole ``--drain-seconds``."""
    api = ApiProcessWith(launch.redis_url, "--workers", "2", "--drain-seconds", "600")
    launch.adopt(api)
    api.start()
    process = api.process
    assert process is not None
    with _reaping_children_of(api) as children:
        assert len(children) >= 2  # the uvicorn workers (and multiprocessing's tracker)
        process.send_signal(signal.SIGTERM)
        # Every child drains: each connection lands on either; ask a few times.
        for _ in range(4):
            await eventually_async(lambda: _draining(client, api.url))
        process.send_signal(signal.SIGTERM)
        try:
            await anyio.to_thread.run_sync(lambda: process.wait(10))  # not 600 s
        except subprocess.TimeoutExpired:
            pytest.fail("a second SIGTERM to the parent did not cut the 600 s drain short")


# -- 1. idempotent create ----------------------------------------------------------------


async def test_the_same_request_matches_whatever_json_spelling_its_numbers_have(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    """docs/http.md: the key's request is "the endpoint and the body, compared as JSON (key
    order and spacing do not matter)". ``1`` and ``1.0`` (or ``1e0``) are the same JSON
    number, and serialisers differ on which they write (JavaScript's ``JSON.stringify(1.0)``
    is ``1``; Python's ``json.dumps(1.0)`` is ``1.0``), so a retry sent through another
    client, or re-serialised by a proxy, is the same request. The fingerprint hashes the
    body as Python re-dumps it, which keeps int and float apart: the retry is refused with
    422 ``idempotency_key_reused``."""
    api = launch.api()
    key = str(uuid.uuid4())
    body = create_request(max_tokens=3, seed=1)
    first = {**body, "temperature": 1.0}
    again = {**body, "temperature": 1}
    headers = {"Idempotency-Key": key}
    made = await client.post(f"{api.url}/v1/streams", json=first, headers=headers)
    assert made.status_code == 201, made.text
    retried = await client.post(f"{api.url}/v1/streams", json=again, headers=headers)
    assert retried.status_code == 200, retried.text
    assert retried.json()["id"] == made.json()["id"]


# -- 2. the worker's endpoint and its stop -----------------------------------------------


async def test_a_worker_told_to_stop_while_redis_hangs_still_exits(
    client: httpx.AsyncClient,
) -> None:
    """A worker with no job, SIGTERMed while its Redis is hung (SIGSTOP: connections open,
    nothing answers), never exits: arq's ``close()`` deletes its health-check key through a
    pool without a socket timeout, and waits on it forever. Meanwhile ``/readyz`` says
    ``draining`` indefinitely, and a second SIGTERM changes nothing (arq's handler only
    cancels tasks already cancelled): only a SIGKILL ends it. The api bounds its own stop
    (uvicorn's 5 s); a worker should too."""
    with running_server() as redis_server:
        assert redis_server.process is not None
        worker = WorkerWithEndpoint(redis_server.url)
        try:
            worker.start()
            assert (await client.get(f"{worker.url}/readyz")).status_code == 200
            process = worker.process
            assert process is not None
            redis_server.process.send_signal(signal.SIGSTOP)
            try:
                process.send_signal(signal.SIGTERM)
                await eventually_async(lambda: _worker_draining(client, worker.url))
                process.send_signal(signal.SIGTERM)  # and again: still nothing
                try:
                    await anyio.to_thread.run_sync(lambda: process.wait(10))
                except subprocess.TimeoutExpired:
                    pytest.fail("the worker is still running 10 s after SIGTERM (Redis hung)")
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
        finally:
            worker.stop(signal.SIGKILL)


async def _worker_draining(client: httpx.AsyncClient, base: str) -> bool:
    response = await client.get(f"{base}/readyz", timeout=5)
    return response.status_code == 503 and response.json() == {"status": "draining"}


def test_a_worker_told_to_stop_while_redis_is_down_exits_cleanly() -> None:
    """A worker SIGTERMed while its Redis is down (refused connections) exits 1 with
    "streambroker: error: cannot reach Redis at REDIS_URL": arq's ``close()`` lets the
    failed delete of its health-check key out, and ``on_shutdown`` never runs. A stop that
    was asked for is not a failure: supervisors that restart on failure (compose
    ``restart: on-failure``, systemd ``Restart=on-failure``) or alert on it are misled,
    though the worker did what it was told. The poll already rides out an outage; the stop
    should too, and exit 0."""
    with running_server() as redis_server:
        worker = WorkerWithEndpoint(redis_server.url)
        try:
            worker.start()
            assert httpx.get(f"{worker.url}/readyz", timeout=5).status_code == 200
            process = worker.process
            assert process is not None
            redis_server.kill()
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(15)
            assert returncode == 0, worker.output()[-600:]
        finally:
            worker.stop(signal.SIGKILL)


def test_a_worker_told_to_stop_as_it_starts_exits(redis_server: RedisServer) -> None:
    """A worker SIGTERMed just after it said "Starting worker" (a deploy that rolls it again
    at once, a scale-down) kept polling for good, taking no jobs and never exiting, until its
    supervisor killed it: arq's cancel of its main task was lost in its start-up Redis calls.
    It hung nearly every time; three tries show it."""
    for _ in range(3):
        worker = BrokerProcess(
            "worker", "--port", "0", env={"REDIS_URL": redis_server.url}, name="worker"
        )
        try:
            worker.start()
            worker.wait_for_output("Starting worker")
            process = worker.process
            assert process is not None
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0, worker.output()[-600:]
        finally:
            worker.stop(signal.SIGKILL)


# -- 1. idempotent create: connection slots on replays -----------------------------------

_TENANT_KEY = "tenant-a-key-0123456789"


async def test_a_client_that_read_its_replayed_stream_to_the_end_may_open_the_next(
    launch: Launcher, client: httpx.AsyncClient
) -> None:
    """With ``BROKER_MAX_CONNECTIONS_PER_TENANT=1``, a client that reads each answer to its
    end before it sends the next request never holds two connections. Yet a streamed chat
    completion replayed (the same ``Idempotency-Key``: the generation has ended, its whole
    log is sent at once) is often refused 429 ``too_many_connections`` right after the
    previous one was read in full: the slot is given back only after the response's last
    byte went out, and the replay takes its slot first thing, before its create. (Plain
    creates and ``GET …/events`` lose the same race far less often: they take their slot
    a Redis round trip later.)"""
    api = launch.api_and_worker(
        {
            "BROKER_API_KEYS": f"{_TENANT_KEY}:tenant-a",
            "BROKER_READ_TOKEN_SECRETS": "s" * 32,
            "BROKER_MAX_CONNECTIONS_PER_TENANT": "1",
        }
    )
    headers = {"Authorization": f"Bearer {_TENANT_KEY}", "Idempotency-Key": str(uuid.uuid4())}
    body = {**create_request(max_tokens=5, seed=2), "stream": True}
    statuses = []
    for _ in range(20):
        response = await client.post(f"{api.url}/v1/chat/completions", json=body, headers=headers)
        statuses.append(response.status_code)  # the body was read in full
    assert statuses == [200] * 20
