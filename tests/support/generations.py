"""Creating fake-model generations over HTTP and checking what clients received."""

from __future__ import annotations

from typing import Any

import httpx

from broker.generation_log import GenerationLog, LogWriter
from broker.state import GenerationState, Status, new_stream_id, now_ms
from tests.support.sse import Received
from workers.providers.fake import fake_tokens

MESSAGES = [{"role": "user", "content": "Tell me about durable logs"}]


def bearer(key: str | None) -> dict[str, str]:
    """The ``Authorization`` header of an API key; no header without one."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def create_request(
    *,
    max_tokens: int = 40,
    rate: float = 400,
    seed: int = 0,
    messages: list[dict[str, Any]] = MESSAGES,
    metadata: dict[str, Any] | None = None,
    **fake: Any,
) -> dict[str, Any]:
    """The body of a create of the ``fake`` model at ``rate`` tokens/s; ``fake``: its other
    options (``fail_after_tokens``…)."""
    body: dict[str, Any] = {
        "model": "fake",
        "messages": messages,
        "max_tokens": max_tokens,
        "fake": {"tokens_per_second": rate, "seed": seed, **fake},
    }
    if metadata is not None:
        body["metadata"] = metadata
    return body


async def create(
    client: httpx.AsyncClient, base: str, *, key: str | None = None, **request: Any
) -> str:
    """``POST /v1/streams`` of ``create_request(**request)`` as ``key``'s tenant: its id."""
    response = await client.post(
        f"{base}/v1/streams", json=create_request(**request), headers=bearer(key)
    )
    assert response.status_code == 201, response.text
    stream_id: str = response.json()["id"]
    return stream_id


def create_stream(
    to: httpx.Client | str, *, key: str | None = None, **request: Any
) -> dict[str, Any]:
    """``create`` from sync code, to a client (the in-process app's ``TestClient``) or a
    base URL: the whole answer (``id``, ``read_token``…)."""
    body, headers = create_request(**request), bearer(key)
    if isinstance(to, str):
        response = httpx.post(f"{to}/v1/streams", json=body, headers=headers, timeout=10)
    else:
        response = to.post("/v1/streams", json=body, headers=headers)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


def stream_state(to: httpx.Client | str, stream_id: str, key: str | None = None) -> dict[str, Any]:
    """``GET /v1/streams/{id}`` from sync code (as ``create_stream``), asserted 200."""
    url, headers = f"/v1/streams/{stream_id}", bearer(key)
    if isinstance(to, str):
        response = httpx.get(f"{to}{url}", headers=headers, timeout=10)
    else:
        response = to.get(url, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def expected_text(max_tokens: int, seed: int = 0) -> str:
    return "".join(fake_tokens(MESSAGES, max_tokens, seed))


async def state(client: httpx.AsyncClient, base: str, stream_id: str) -> dict[str, Any]:
    response = await client.get(f"{base}/v1/streams/{stream_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_well_formed(events: list[Received]) -> None:
    """Ids strictly increase, ``metadata`` comes first, exactly one terminal event, last."""
    ids = [e.id for e in events]
    assert ids == sorted(set(ids)), f"ids not strictly increasing: {ids}"
    terminals = [e for e in events if e.type in ("done", "error")]
    assert len(terminals) == 1
    assert events[-1] is terminals[0]


async def claimed(
    log: GenerationLog, *, lease_seconds: float = 30, tenant: str = "", worker: str = "w"
) -> tuple[str, LogWriter]:
    """A new generation of the fake model (``tenant``'s), claimed by a writer the test drives
    itself (as ``worker``)."""
    state = GenerationState(
        id=new_stream_id(),
        model="fake",
        status=Status.QUEUED,
        created_at_ms=now_ms(),
        request={"model": "fake", "messages": []},
        tenant=tenant,
    )
    await log.create(state)
    claim = await log.claim(state.id, worker=worker, lease_seconds=lease_seconds)
    return state.id, log.writer(state.id, claim, lease_seconds=lease_seconds)


def finish_as_a_worker(redis_url: str, stream_id: str, text: str, tokens: int = 1) -> None:
    """From a sync test: claim a created stream and write ``metadata``, one token event
    (``text``, counting ``tokens``) and ``done`` with usage, as a worker would."""
    import asyncio

    import redis.asyncio as aioredis

    from broker.events import Event, EventType

    async def write() -> None:
        store = aioredis.Redis.from_url(redis_url)
        log = GenerationLog(store, retention_seconds=600)
        claim = await log.claim(stream_id, worker="test", lease_seconds=5)
        usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
        await log.writer(stream_id, claim, lease_seconds=5).append(
            Event(EventType.METADATA, {"id": stream_id}, t=0),
            Event(EventType.TOKEN, {"text": text, "tokens": tokens}, t=1),
            Event(EventType.DONE, {"finish_reason": "stop", "usage": usage}, t=2),
        )
        await store.aclose()

    asyncio.run(write())
