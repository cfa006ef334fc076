"""The archive's settings (a malformed URL, one that must not leak its password, an archive
delay that Redis's retention would beat) and the merge of a listing page from Redis with one
from the archive: one order, one cursor, no generation twice or missed."""

from __future__ import annotations

import random

import pytest

from broker.errors import ConfigError
from broker.listing import Cursor, _merged
from broker.settings import Settings
from broker.state import GenerationState, Status


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://db/streambroker", "expected a postgresql://"),
        ("postgresql://db:5432", "names no database"),
        ("postgresql://db:port/x", "bad port"),
        ("postgresql:///x", "names no host"),
    ],
)
def test_a_malformed_archive_url_is_refused_in_one_line_without_its_password(
    url: str, says: str
) -> None:
    secret_url = url.replace("//", "//user:hunter2secret@", 1)
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"BROKER_ARCHIVE_URL": secret_url})
    message = str(info.value)
    assert message.startswith("BROKER_ARCHIVE_URL is malformed")
    assert says in message
    assert "hunter2secret" not in message
    assert "\n" not in message


def test_the_archive_delay_must_be_shorter_than_redis_retention() -> None:
    with pytest.raises(ConfigError, match="BROKER_ARCHIVE_AFTER_SECONDS=600 must be less"):
        Settings.from_env(
            {
                "BROKER_ARCHIVE_URL": "postgresql://db/x",
                "BROKER_ARCHIVE_AFTER_SECONDS": "600",
                "BROKER_RETENTION_SECONDS": "600",
                "BROKER_QUEUE_TIMEOUT_SECONDS": "60",
            }
        )
    archive = Settings.from_env({"BROKER_ARCHIVE_URL": "postgres://u@db:5432/x?sslmode=require"})
    assert archive.archive.archive_url == "postgres://u@db:5432/x?sslmode=require"
    assert archive.archive.archive_after_seconds == 300
    assert archive.archive.archive_retention_seconds == 0
    assert Settings.from_env({}).archive.archive_url is None


def generation(created_at_ms: int, stream_id: str) -> GenerationState:
    return GenerationState(
        id=stream_id,
        model="fake",
        status=Status.COMPLETED,
        created_at_ms=created_at_ms,
        request={},
    )


def page(
    states: list[GenerationState], cursor: Cursor | None, limit: int
) -> tuple[list[GenerationState], Cursor | None]:
    """What a tier's listing returns: up to ``limit`` after ``cursor``, newest first, and its
    cursor when there may be more."""
    ordered = sorted(states, key=lambda s: (s.created_at_ms, s.id), reverse=True)
    if cursor is not None:
        ordered = [s for s in ordered if (s.created_at_ms, s.id) < (cursor.score, cursor.stream_id)]
    taken = ordered[:limit]
    more = len(ordered) > limit
    return taken, Cursor(taken[-1].created_at_ms, taken[-1].id) if more else None


@pytest.mark.parametrize("seed", range(30))
def test_pages_merged_from_both_tiers_list_every_generation_once_in_order(seed: int) -> None:
    rng = random.Random(seed)
    everything = [generation(rng.randrange(20), f"id{n:03d}") for n in range(rng.randrange(1, 40))]
    # Some only in Redis, some only archived, some in both (archived, not let go yet).
    hot, cold = [], []
    for state in everything:
        where = rng.choice(("hot", "cold", "both"))
        if where in ("hot", "both"):
            hot.append(state)
        if where in ("cold", "both"):
            cold.append(state)
    limit = rng.randrange(1, 6)
    listed: list[str] = []
    cursor = None
    for _ in range(100):
        states, cursor = _merged(page(hot, cursor, limit), page(cold, cursor, limit), limit)
        assert len(states) <= limit
        listed += [s.id for s in states]
        if cursor is None:
            break
    expected = sorted(everything, key=lambda s: (s.created_at_ms, s.id), reverse=True)
    assert listed == [s.id for s in expected]
