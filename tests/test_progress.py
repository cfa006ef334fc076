"""Progress figures with explicit clocks: rate, percent, ETA, and the report cadence."""

from __future__ import annotations

import pytest

from workers.progress import ProgressTracker


def test_nothing_is_due_before_the_first_token() -> None:
    p = ProgressTracker(interval=0.5, estimated_total=100)
    assert not p.due(0.0)
    assert not p.due(1000.0)
    assert p.snapshot(0.0) == {
        "tokens": 0,
        "tokens_per_second": 0.0,
        "estimated_total": 100,
        "percent": 0.0,
        "eta_ms": None,
    }


def test_rate_counts_tokens_after_the_first_one() -> None:
    p = ProgressTracker(interval=0.5, estimated_total=None)
    p.record(1, now=10.0)
    assert p.rate(10.0) == 0.0
    assert p.rate(12.0) == 0.0  # one token alone is no rate
    p.record(20, now=12.0)
    # 20 tokens came in the 2 s after the first one.
    assert p.rate(12.0) == pytest.approx(10.0)
    assert p.rate(14.0) == pytest.approx(5.0)


def test_rate_with_no_elapsed_time_is_zero() -> None:
    p = ProgressTracker(interval=0.5, estimated_total=None)
    p.record(5, now=3.0)
    assert p.rate(3.0) == 0.0


def test_percent_eta_and_total_from_max_tokens() -> None:
    p = ProgressTracker(interval=0.5, estimated_total=200)
    p.record(1, now=0.0)
    p.record(49, now=1.0)
    snap = p.snapshot(1.0)
    assert snap["tokens"] == 50
    assert snap["tokens_per_second"] == pytest.approx(49.0)
    assert snap["estimated_total"] == 200
    assert snap["percent"] == pytest.approx(25.0)
    # 150 tokens to go at 49 tokens/s.
    assert snap["eta_ms"] == pytest.approx(1000 * 150 / 49, abs=1)


def test_without_an_estimate_percent_and_eta_are_null() -> None:
    p = ProgressTracker(interval=0.5, estimated_total=None)
    p.record(1, now=0.0)
    p.record(9, now=1.0)
    snap = p.snapshot(1.0)
    assert snap["tokens"] == 10
    assert snap["tokens_per_second"] == pytest.approx(9.0)
    assert snap["estimated_total"] is None
    assert snap["percent"] is None
    assert snap["eta_ms"] is None


def test_the_estimated_total_never_falls_below_the_tokens_so_far() -> None:
    p = ProgressTracker(interval=0.5, estimated_total=10)
    p.record(1, now=0.0)
    p.record(14, now=1.0)
    snap = p.snapshot(1.0)
    assert snap["estimated_total"] == 15
    assert snap["percent"] == pytest.approx(100.0)
    assert snap["eta_ms"] == 0


def test_a_report_is_due_once_per_interval() -> None:
    p = ProgressTracker(interval=0.5, estimated_total=None)
    p.record(1, now=10.0)
    assert not p.due(10.0)
    assert not p.due(10.49)
    assert p.due(10.5)
    p.report(10.5)
    p.record(3, now=10.6)
    assert not p.due(10.6)
    assert not p.due(10.99)
    assert p.due(11.0)


def test_a_report_is_due_only_after_new_tokens() -> None:
    p = ProgressTracker(interval=0.5, estimated_total=None)
    p.record(2, now=0.0)
    assert p.report(0.5)["tokens"] == 2
    assert not p.due(1.0)
    assert not p.due(100.0)
    p.record(1, now=100.0)
    assert p.due(100.0)
    assert p.report(100.0)["tokens"] == 3


def test_a_report_is_the_snapshot_at_that_time() -> None:
    p = ProgressTracker(interval=1.0, estimated_total=40)
    p.record(1, now=0.0)
    p.record(9, now=2.0)
    assert p.report(2.0) == p.snapshot(2.0)
    assert p.report(2.0)["tokens"] == 10


def test_reported_tokens_only_grow() -> None:
    p = ProgressTracker(interval=0.1, estimated_total=50)
    reported = []
    now = 0.0
    for step in range(30):
        now += 0.05
        p.record(step % 3 + 1, now)
        if p.due(now):
            reported.append(p.report(now))
    assert len(reported) >= 5
    tokens = [r["tokens"] for r in reported]
    assert tokens == sorted(set(tokens))
    assert all(r["estimated_total"] >= r["tokens"] for r in reported)
    assert all(0 <= r["percent"] <= 100 for r in reported)
