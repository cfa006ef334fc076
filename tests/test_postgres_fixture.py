"""The PostgreSQL fixtures' own promises (``tests.support.postgres``): a scratch database of
its own, there while the test runs and gone after; a private server that can be stopped,
killed and restarted on its data; and, under CI, a failure rather than a skip when
PostgreSQL is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from tests.support import postgres
from tests.support.postgres import PostgresServer, scratch_database, shared_or_fail
from tests.support.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent


async def databases(admin_url: str) -> set[str]:
    connection = await asyncpg.connect(admin_url)
    try:
        return {row["datname"] for row in await connection.fetch("SELECT datname FROM pg_database")}
    finally:
        await connection.close()


async def notes(url: str) -> list[str]:
    """The ``note`` table's texts, in order of insertion."""
    connection = await asyncpg.connect(url)
    try:
        return [row["text"] for row in await connection.fetch("SELECT text FROM note ORDER BY id")]
    finally:
        await connection.close()


async def write_notes(url: str, *texts: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS note (id serial PRIMARY KEY, text text NOT NULL)"
        )
        await connection.executemany("INSERT INTO note (text) VALUES ($1)", [(t,) for t in texts])
    finally:
        await connection.close()


# ------------------------------------------------------------------ scratch databases


@pytest.mark.anyio
async def test_scratch_database_exists_while_used_and_is_dropped_after() -> None:
    admin = shared_or_fail()
    with scratch_database(admin) as url:
        name = postgres.database_name(url)
        assert name.startswith("sb_test_")
        assert name in await databases(admin)
        left_open = await asyncpg.connect(url)
        assert await left_open.fetchval("SELECT current_database()") == name
        await write_notes(url, "kept while the test runs")
        assert await notes(url) == ["kept while the test runs"]
    # Dropped WITH (FORCE): the connection the test left open did not keep it.
    assert name not in await databases(admin)
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
        await left_open.fetchval("SELECT 1")
    left_open.terminate()


@pytest.mark.anyio
async def test_two_scratch_databases_are_distinct(archive_url: str) -> None:
    with scratch_database(shared_or_fail()) as other:
        assert postgres.database_name(other) != postgres.database_name(archive_url)
        await write_notes(archive_url, "only in the first")
        await write_notes(other, "only in the second")
        assert await notes(archive_url) == ["only in the first"]
        assert await notes(other) == ["only in the second"]


# -------------------------------------------------------------------- private servers


@pytest.mark.anyio
async def test_stopped_server_refuses_connections_then_restarts_with_its_data(
    postgres_server: PostgresServer,
) -> None:
    url, port = postgres_server.url, postgres_server.port
    await write_notes(url, "before the stop")

    postgres_server.stop()
    assert postgres_server.process is not None
    assert postgres_server.process.returncode == 0  # a clean (fast) shutdown
    with pytest.raises(ConnectionRefusedError):  # nothing listens
        await asyncpg.connect(url, timeout=5)
    assert postgres.postgres_available(url) is not None

    postgres_server.start()
    assert (postgres_server.url, postgres_server.port) == (url, port)
    assert await notes(url) == ["before the stop"]


@pytest.mark.anyio
async def test_killed_server_restarts_with_what_was_committed(
    postgres_server: PostgresServer,
) -> None:
    url = postgres_server.url
    await write_notes(url, "committed")
    in_flight = await asyncpg.connect(url)
    transaction = in_flight.transaction()
    await transaction.start()
    await in_flight.execute("INSERT INTO note (text) VALUES ('never committed')")

    postgres_server.kill()
    assert postgres_server.process is not None
    assert postgres_server.process.returncode == -signal.SIGKILL
    assert postgres_server.pids() == []  # no orphaned backend outlives the crash
    assert postgres.postgres_available(url) is not None
    in_flight.terminate()

    postgres_server.start()  # crash recovery from the WAL
    assert await notes(url) == ["committed"]
    assert "automatic recovery in progress" in postgres_server.log_tail(size=100_000)


def test_private_server_directory_is_removed_by_cleanup() -> None:
    with postgres.running_postgres() as server:
        directory = server.dir
        assert (directory / "data" / "PG_VERSION").exists()
    assert not directory.exists()
    assert postgres.postgres_available(server.url) is not None


# ------------------------------------------------------------------------ CI: fail, never skip


def unreachable_url() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"


def outcome(call: Callable[[], object]) -> BaseException:
    """What ``call`` ended the test with: a skip or a failure (a skip is caught too, so that
    a skip where a failure is due fails this test rather than skipping it)."""
    try:
        call()
    except (pytest.fail.Exception, pytest.skip.Exception) as ended:
        return ended
    raise AssertionError(f"{call} neither skipped nor failed the test")


def start_private_server() -> None:
    with postgres.running_postgres():
        pass


def set_ci(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)


def assert_ended(ended: BaseException, expected: str, reason: str) -> None:
    """A failure under CI saying why skipping is not allowed, a skip outside; both with the
    reason."""
    if expected == "fail":
        assert isinstance(ended, pytest.fail.Exception), f"skipped under CI: {ended}"
        assert "must not be skipped under CI" in str(ended)
    else:
        assert isinstance(ended, pytest.skip.Exception), f"failed outside CI: {ended}"
    assert reason in str(ended)


@pytest.mark.parametrize(("ci", "expected"), [("true", "fail"), (None, "skip")])
def test_unreachable_shared_server(
    monkeypatch: pytest.MonkeyPatch, ci: str | None, expected: str
) -> None:
    set_ci(monkeypatch, ci)
    ended = outcome(lambda: shared_or_fail(unreachable_url()))
    assert_ended(ended, expected, "cannot be reached")


@pytest.mark.parametrize(("ci", "expected"), [("true", "fail"), (None, "skip")])
def test_missing_binaries(monkeypatch: pytest.MonkeyPatch, ci: str | None, expected: str) -> None:
    monkeypatch.setattr(postgres, "postgres_binaries", lambda: None)
    set_ci(monkeypatch, ci)
    assert_ended(outcome(start_private_server), expected, "not installed")


def test_shared_url_is_overridable() -> None:
    url = "postgresql://archivist@db.example:6543/archive"
    shown = subprocess.run(
        [sys.executable, "-c", "from tests.support.postgres import SHARED_URL; print(SHARED_URL)"],
        env={**os.environ, postgres.URL_ENV: url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shown.stdout.strip() == url
