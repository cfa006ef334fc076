"""Node.js client libraries nobody here wrote, unchanged, against a live broker (Redis, an
api process, a worker, and the local OpenAI-compatible upstream for ``echo-model`` and
``tool-model``). Each case runs a script of ``tests/clients/node`` with the pinned Node 22
and libraries (``package-lock.json``), which prints what the library observed; the
assertions are here.

This module covers the SSE libraries ``eventsource`` and ``@microsoft/fetch-event-source``:
the broker's own format and OpenAI's through a proxy that cuts every connection, resumed by
the library with ``Last-Event-ID``, and no event for heartbeats.

Answers are compared with the exact text of the deterministic ``fake`` model (or the
upstream's scripted answers), never with what another client of the same broker received.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.generations import expected_text
from tests.support.node import CUT_RATE, CUT_TOKENS, NATIVE_CUTS, OPENAI_CUTS, NodeBroker, usage
from tests.support.resuming import assert_strictly_increasing

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.redis]


SSE_LIBRARIES = ["eventsource.mjs", "fetch-event-source.mjs"]


def assert_native_read(got: dict[str, Any], text: str, tokens: int) -> None:
    """``metadata`` first, the exact text, every id once and in order, ``done`` last with its
    usage; only the broker's named events (no ``message``, no unnamed or empty event)."""
    events = got["events"]
    types = [e[0] for e in events]
    assert types[0] == "metadata"
    assert types[-1] == "done"
    assert set(types) <= {"metadata", "token", "progress", "done"}
    assert_strictly_increasing([e[1] for e in events])
    assert "".join(json.loads(e[2])["text"] for e in events if e[0] == "token") == text
    done = json.loads(events[-1][2])
    assert done["finish_reason"] == "stop"
    assert done["usage"] == usage(tokens)
    assert got["empty_messages"] == 0


def assert_openai_read(got: dict[str, Any], script: str, text: str, tokens: int) -> None:
    """Unnamed events carrying chunks, ``[DONE]`` last: each chunk's ``event_id`` is the SSE
    id it came under, ids strictly increase, the text is exact, the finish and usage chunks
    come once. A resumed connection's role chunk has no SSE id and repeats the resume point."""
    events = got["events"]
    assert events[-1][2] == "[DONE]"
    chunks, ids = [], []
    for position, (name, sse_id, data) in enumerate(events[:-1]):
        assert name in ("message", "")  # EventSource's name for unnamed events, and the other's
        chunk = json.loads(data)
        if position > 0 and chunk["choices"] and "role" in chunk["choices"][0]["delta"]:
            # A resumed connection's lead: EventSource's lastEventId is still the resume
            # point; fetch-event-source reports the frame's own id, which it has none of.
            assert sse_id == (chunk["event_id"] if script == "eventsource.mjs" else "")
            continue
        assert chunk["event_id"] == sse_id
        chunks.append(chunk)
        ids.append(sse_id)
    assert_strictly_increasing(ids)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in choices) == text
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["stop"]
    assert [c["usage"] for c in chunks if c.get("usage")] == [usage(tokens)]
    assert got["empty_messages"] == 0


def assert_premature_ids_only_at_the_id_line(got: dict[str, Any]) -> None:
    """fetch-event-source commits an id when it parses the ``id:`` line, not when the event
    is complete (its script sends the last delivered id instead, and records where the
    library's own choice differed). Because the broker puts ``id:`` last in every event, that
    only happens to a connection cut exactly between the ``id:`` line and the blank line."""
    for chosen, tail in got.get("premature_ids", []):
        assert tail.endswith(f"\nid: {chosen}\n"), (chosen, tail)


@pytest.mark.parametrize("script", SSE_LIBRARIES)
async def test_sse_libraries_resume_the_native_format_through_cuts(
    node_broker: NodeBroker, script: str
) -> None:
    """The broker's own events through a proxy that cuts every connection, the library
    reconnecting by itself with ``Last-Event-ID``: everything exactly once, in order
    (``assert_native_read``); any id fetch-event-source took too early was at a cut right
    after its ``id:`` line."""
    async with node_broker.cutting(NATIVE_CUTS, seed=8) as proxy:
        params = {"maxTokens": CUT_TOKENS, "seed": 8, "rate": CUT_RATE}
        got = await node_broker.run(script, "native", params, proxy)
    assert proxy.cuts > 0
    assert got["reconnects"] > 1
    assert_native_read(got, expected_text(CUT_TOKENS, seed=8), CUT_TOKENS)
    assert_premature_ids_only_at_the_id_line(got)


@pytest.mark.parametrize("script", SSE_LIBRARIES)
async def test_sse_libraries_resume_the_openai_format_through_cuts(
    node_broker: NodeBroker, script: str
) -> None:
    """``format=openai`` (ids ``<n>`` and ``<n>.<k>``, the ``id:`` line last) through the
    cutting proxy, resumed by the library: every chunk exactly once (``assert_openai_read``);
    any id fetch-event-source took too early was at a cut right after its ``id:`` line."""
    async with node_broker.cutting(OPENAI_CUTS, seed=9) as proxy:
        params = {"maxTokens": CUT_TOKENS, "seed": 9, "rate": CUT_RATE}
        got = await node_broker.run(script, "openai", params, proxy)
    assert proxy.cuts > 0
    assert got["reconnects"] > 1
    assert_openai_read(got, script, expected_text(CUT_TOKENS, seed=9), CUT_TOKENS)
    assert_premature_ids_only_at_the_id_line(got)


@pytest.mark.parametrize("wire", ["native", "openai"])
@pytest.mark.parametrize("script", SSE_LIBRARIES)
async def test_sse_libraries_see_no_event_for_heartbeats(
    node_broker: NodeBroker, script: str, wire: str
) -> None:
    """An answer slower than the heartbeat (0.3 s): ``: ping`` lines come between the events
    on the wire (counted there), yet the libraries hand over nothing for them; neither for
    the opening ping nor the ``retry:`` line. fetch-event-source dispatches every block that
    a blank line ends, empty or not, so a ping or ``retry:`` block would reach it."""
    got = await node_broker.run(script, wire, {"maxTokens": 4, "seed": 12, "rate": 2.5})
    assert got["pings"] >= 2  # the opening one, and heartbeats between tokens
    assert got["reconnects"] == 0
    if wire == "native":
        assert_native_read(got, expected_text(4, seed=12), 4)
    else:
        assert_openai_read(got, script, expected_text(4, seed=12), 4)
