"""Generation ids, timestamps, and the meta hash form of a generation's state."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime

import pytest

from broker.state import (
    GenerationState,
    Status,
    is_stream_id,
    iso_ms,
    new_stream_id,
    now_ms,
)

ALPHABET = set("0123456789abcdefghjkmnpqrstvwxyz")


def test_a_new_id_is_26_url_safe_characters() -> None:
    stream_id = new_stream_id()
    assert len(stream_id) == 26
    assert set(stream_id) <= ALPHABET
    assert is_stream_id(stream_id)


def test_ids_are_ordered_by_their_millisecond() -> None:
    base = 1_700_000_000_000
    ids = [new_stream_id(base + step) for step in (0, 1, 2, 1000, 86_400_000, 10**10)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_of_one_millisecond_share_the_time_prefix_and_differ() -> None:
    ids = {new_stream_id(1_700_000_000_000) for _ in range(50)}
    assert len(ids) == 50
    assert len({i[:10] for i in ids}) == 1


def test_ids_are_unique_over_many() -> None:
    ids = [new_stream_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(is_stream_id(i) for i in ids)


def test_ids_follow_the_clock() -> None:
    before = new_stream_id(now_ms() - 1)
    current = new_stream_id()
    after = new_stream_id(now_ms() + 1000)
    assert before < current < after


@pytest.mark.parametrize(
    "text",
    [
        "",
        "01hv2ke9zq4x8m3n6r5t7w9y1",  # 25
        "01hv2ke9zq4x8m3n6r5t7w9y1ab",  # 27
        "01hv2ke9zq4x8m3n6r5t7w9y1i",  # i is not Crockford
        "01hv2ke9zq4x8m3n6r5t7w9y1l",  # l is not Crockford
        "01hv2ke9zq4x8m3n6r5t7w9y1o",  # o is not Crockford
        "01hv2ke9zq4x8m3n6r5t7w9y1u",  # u is not Crockford
        "01hv2ke9zq4x8m3n6r5t7w9y1{",
        "{1hv2ke9zq4x8m3n6r5t7w9y1}",
        "01hv2ke9zq4x8m3n6r5t7w9y1-",
        "01hv2ke9zq4x8m3n6r5t7w9y1/",
        "01hv2ke9zq4x8m3n6r5t7w9y 1",
        "../../../../../etc/passwd0",
        "01hv2ke9zq4x8m3n6r5t7w9y1é",
    ],
)
def test_is_stream_id_rejects_other_text(text: str) -> None:
    assert not is_stream_id(text)


def test_is_stream_id_accepts_a_well_formed_id() -> None:
    assert is_stream_id("01hv2ke9zq4x8m3n6r5t7w9y1a")


@pytest.mark.parametrize(
    "moment",
    [
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2023, 11, 14, 22, 13, 20, 123_000, tzinfo=UTC),
        datetime(2024, 2, 29, 23, 59, 59, 999_000, tzinfo=UTC),
        datetime(2031, 7, 4, 5, 6, 7, 8_000, tzinfo=UTC),
    ],
)
def test_iso_ms_is_rfc3339_utc_with_milliseconds(moment: datetime) -> None:
    ms = round(moment.timestamp() * 1000)
    text = iso_ms(ms)
    assert text is not None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text)
    assert datetime.fromisoformat(text.replace("Z", "+00:00")) == moment


def test_iso_ms_of_none_is_none() -> None:
    assert iso_ms(None) is None


def test_status_terminality() -> None:
    assert {s for s in Status if s.terminal} == {Status.COMPLETED, Status.FAILED, Status.CANCELLED}


def hash_of(state: GenerationState) -> dict[bytes, bytes]:
    """What redis-py's HGETALL returns for the fields ``to_hash`` wrote."""
    return {k.encode(): v.encode() for k, v in state.to_hash().items()}


def test_state_round_trips_through_its_hash() -> None:
    state = GenerationState(
        id=new_stream_id(),
        model="fake",
        status=Status.QUEUED,
        created_at_ms=1_700_000_000_123,
        request={
            "model": "fake",
            "messages": [{"role": "user", "content": "Grüß dich"}],
            "max_tokens": 5,
            "fake": {"tokens_per_second": 50.0, "seed": 1, "fail_after_tokens": None},
        },
        tenant="tenant-a",
        metadata={"session": "abc", "n": 1, "ok": True},
        attempt=2,
        last_seq=9,
    )
    assert GenerationState.from_hash(hash_of(state)) == state


def test_a_minimal_state_round_trips_with_its_defaults() -> None:
    state = GenerationState(
        id=new_stream_id(),
        model="m",
        status=Status.QUEUED,
        created_at_ms=1,
        request={"model": "m", "messages": []},
    )
    again = GenerationState.from_hash(hash_of(state))
    assert again == state
    assert again.tenant == ""
    assert again.metadata == {}
    assert again.attempt == 0
    assert again.last_seq == 0
    assert again.text == ""
    assert again.cancel_requested is False


def test_the_hash_stores_plain_strings() -> None:
    state = GenerationState(
        id="x", model="m", status=Status.RUNNING, created_at_ms=5, request={"a": [1]}, attempt=3
    )
    stored = state.to_hash()
    assert all(isinstance(v, str) for v in stored.values())
    assert stored["status"] == "running"
    assert stored["attempt"] == "3"


def test_from_hash_reads_the_fields_scripts_write_and_the_text() -> None:
    state = GenerationState(
        id="x",
        model="m",
        status=Status.QUEUED,
        created_at_ms=1000,
        request={"model": "m", "messages": []},
    )
    raw = hash_of(state) | {
        b"status": b"completed",
        b"started_at_ms": b"1100",
        b"first_token_at_ms": b"1150",
        b"finished_at_ms": b"1900",
        b"finish_reason": b"length",
        b"usage": b'{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}',
        b"cancel_requested": b"1",
        b"worker": b"w-1",
        b"lease_until_ms": b"99999",
    }
    got = GenerationState.from_hash(raw, "Grüß".encode())
    assert got.status is Status.COMPLETED
    assert (got.started_at_ms, got.first_token_at_ms, got.finished_at_ms) == (1100, 1150, 1900)
    assert got.finish_reason == "length"
    assert got.usage == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert got.error is None
    assert got.cancel_requested is True
    assert got.text == "Grüß"
    api = got.to_api()
    assert api["time_to_first_token_ms"] == 150
    assert api["created_at"] == iso_ms(1000)
    assert api["text"] == "Grüß"
    assert "text" not in got.to_api(include_text=False)


def test_ids_made_back_to_back_increase_strictly_and_stay_unguessable() -> None:
    """Listings break ties of the same millisecond by id: ids of one process made in the
    same millisecond must follow each other, by a step that is not guessable."""
    ids = [new_stream_id() for _ in range(5_000)]
    assert ids == sorted(set(ids))
    values = [_id_value(i) for i in ids]
    same_ms = [b - a for a, b in itertools.pairwise(values) if a >> 80 == b >> 80]
    assert same_ms, "no two ids in the same millisecond: the loop should be faster than that"
    assert len(set(same_ms)) > len(same_ms) // 2  # random steps, not +1


def _id_value(stream_id: str) -> int:
    value = 0
    for char in stream_id:
        value = value * 32 + "0123456789abcdefghjkmnpqrstvwxyz".index(char)
    return value
