"""The real-Redis fixture's own promise: under CI a missing redis-server fails the run."""

from __future__ import annotations

import pytest

from tests.support import redis_server


def test_missing_redis_server_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must not be skipped under CI"):
        redis_server.start_or_fail()


def test_missing_redis_server_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        redis_server.start_or_fail()
