"""Token batching with explicit clocks: immediate after quiet, windowed when busy, capped."""

from __future__ import annotations

from workers.batching import TokenBatcher

WINDOW = 0.025


def batcher(max_tokens: int = 8) -> TokenBatcher:
    return TokenBatcher(max_age=WINDOW, max_tokens=max_tokens)


def test_nothing_pending_is_never_due_and_has_no_deadline() -> None:
    b = batcher()
    assert b.pending == 0
    assert b.deadline() is None
    assert not b.due(0.0)
    assert not b.due(1e9)


def test_the_first_token_is_due_at_once() -> None:
    b = batcher()
    b.add("Hello")
    assert b.due(100.0)
    deadline = b.deadline()
    assert deadline is not None
    assert deadline <= 100.0


def test_a_token_after_a_quiet_period_is_due_at_once() -> None:
    b = batcher()
    b.add("a")
    b.take(100.0)
    b.add("b")
    assert b.due(100.0 + WINDOW + 0.5)
    assert b.deadline() == 100.0 + WINDOW


def test_tokens_inside_the_window_wait_for_the_deadline() -> None:
    b = batcher()
    b.add("a")
    b.take(100.0)
    b.add("b")
    assert not b.due(100.001)
    b.add("c")
    assert not b.due(100.0 + WINDOW / 2)
    assert b.deadline() == 100.0 + WINDOW
    assert b.due(100.0 + WINDOW)
    assert b.take(100.0 + WINDOW) == ("bc", 2)


def test_the_window_starts_at_the_last_take() -> None:
    b = batcher()
    b.add("a")
    b.take(100.0)
    b.add("b")
    b.take(100.030)
    b.add("c")
    assert not b.due(100.030 + WINDOW - 0.001)
    assert b.deadline() == 100.030 + WINDOW


def test_max_tokens_forces_a_flush_inside_the_window() -> None:
    b = batcher(max_tokens=3)
    b.add("x")
    b.take(100.0)
    b.add("a")
    b.add("b")
    assert not b.due(100.001)
    b.add("c")
    assert b.pending == 3
    assert b.due(100.001)


def test_take_concatenates_in_order_and_empties_the_batch() -> None:
    b = batcher()
    parts = ["The", " quick", " brown", "", " fox", "\n", "é"]
    for part in parts:
        b.add(part)
    assert b.pending == len(parts)
    assert b.take(5.0) == ("".join(parts), len(parts))
    assert b.pending == 0
    assert b.deadline() is None
    assert not b.due(10.0)


def test_take_of_nothing_is_empty() -> None:
    assert batcher().take(1.0) == ("", 0)


def test_a_zero_window_flushes_every_token() -> None:
    b = TokenBatcher(max_age=0.0, max_tokens=64)
    b.add("a")
    b.take(1.0)
    b.add("b")
    assert b.due(1.0)
