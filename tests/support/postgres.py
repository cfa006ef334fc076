"""PostgreSQL for tests (the archive of finished generations; driver asyncpg).

Two kinds, as the Redis support has:

* a scratch database on the shared server (``SHARED_URL``): ``scratch_database`` creates one
  of its own, uniquely named, and drops it afterwards (the ``archive_url`` fixture);
* a private cluster (``PostgresServer``) on a free port and a temp dir, for tests that stop,
  kill and restart their server (the ``postgres_server`` fixture).

Real-PostgreSQL tests are skipped locally when what they need is missing (the shared server
cannot be reached, the binaries are not installed) but fail under CI (``CI`` set), where
they must not be skipped: ``unavailable``.

The plumbing is synchronous (fixtures, ``start``/``stop``): each call runs its asyncpg
coroutine with ``asyncio.run`` on a thread of its own, so it also works inside an async test,
whose event loop is already running on the calling thread.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.support.redis_server import free_port
from tests.support.waiting import eventually

T = TypeVar("T")

#: The shared server the scratch databases are made on (its user may create databases).
URL_ENV = "STREAMBROKER_TEST_POSTGRES_URL"
SHARED_URL = os.environ.get(URL_ENV, "postgresql://postgres@127.0.0.1:5432/postgres")

#: Where ``initdb`` and ``postgres`` are looked for first (else the newest
#: ``/usr/lib/postgresql/*/bin``, else ``PATH``).
BIN_ENV = "STREAMBROKER_TEST_POSTGRES_BIN"

#: The OS user a private cluster runs as when the tests run as root (PostgreSQL refuses root).
OS_USER = "postgres"

#: What a failed connection attempt raises: not listening, refusing (starting up, recovering,
#: shutting down), or not answering in time.
CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


# ------------------------------------------------------------------------ skip or fail


def unavailable(reason: str) -> NoReturn:
    """Skip the test locally, fail it under CI (``CI`` set, as for the Redis fixtures)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; real-PostgreSQL tests must not be skipped under CI")
    pytest.skip(reason)


def shared_or_fail(url: str = SHARED_URL) -> str:
    """``url`` when its server answers; otherwise ``unavailable`` (skip, or fail under CI)."""
    reason = postgres_available(url)
    if reason is not None:
        unavailable(reason)
    return url


# ------------------------------------------------------------------------ connections


def blocking(make: Callable[[], Awaitable[T]]) -> T:
    """Run the coroutine ``make()`` to completion from synchronous code, on a thread and an
    event loop of its own (the caller's thread may be running one: an async test)."""

    async def run() -> T:
        return await make()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, run()).result()


def postgres_available(url: str, timeout: float = 3.0) -> str | None:
    """``None`` when the server at ``url`` accepts a connection and answers a query, else
    why not (a sentence for a skip or a failure)."""

    async def ask() -> None:
        connection = await asyncpg.connect(url, timeout=timeout)
        try:
            await connection.fetchval("SELECT 1", timeout=timeout)
        finally:
            await connection.close(timeout=timeout)

    try:
        blocking(ask)
    except CONNECT_ERRORS as error:
        return (
            f"PostgreSQL at {display(url)} cannot be reached ({type(error).__name__}: {error});"
            f" set {URL_ENV} to a server whose user may create databases"
        )
    return None


def execute(url: str, statement: str, timeout: float = 30.0) -> None:
    """Run one statement, outside a transaction, on a connection of its own."""

    async def run() -> None:
        connection = await asyncpg.connect(url, timeout=timeout)
        try:
            await connection.execute(statement, timeout=timeout)
        finally:
            await connection.close(timeout=timeout)

    blocking(run)


def database_url(url: str, name: str) -> str:
    """``url`` with its database replaced by ``name`` (user, host, port and options kept)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def database_name(url: str) -> str:
    """The database ``url`` names."""
    return urlsplit(url).path.lstrip("/")


def display(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# ------------------------------------------------------------------ scratch databases


@contextmanager
def scratch_database(admin_url: str = SHARED_URL) -> Iterator[str]:
    """A new database of its own (``sb_test_<16 hex digits>``) on ``admin_url``'s server,
    whose URL it yields; dropped on exit, with ``WITH (FORCE)``: connections the test left
    open are ended, they do not keep it."""
    name = f"sb_test_{secrets.token_hex(8)}"
    execute(admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield database_url(admin_url, name)
    finally:
        execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -------------------------------------------------------------------- private clusters


def postgres_binaries() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or ``None``."""
    candidates: list[Path] = []
    if configured := os.environ.get(BIN_ENV):
        candidates.append(Path(configured))
    installed = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(installed, key=lambda path: _version(path.parent.name), reverse=True)
    if on_path := shutil.which("initdb"):
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in ("initdb", "postgres")):
            return directory
    return None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def private_server_unavailable() -> str | None:
    """``None`` when a ``PostgresServer`` can be run here, else why not."""
    if postgres_binaries() is None:
        return (
            "the PostgreSQL server binaries (initdb, postgres) are not installed"
            f" (apt-get install postgresql, or set {BIN_ENV})"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"running as root, and there is no {OS_USER!r} OS user to run PostgreSQL as"
    return None


class PostgresServer:
    """A private PostgreSQL cluster: its own free port and temp dir (``dir``: the data
    directory ``dir/data``, the unix socket, ``postgres.log``), trust authentication for
    ``postgres``. ``start`` runs ``initdb`` the first time; ``stop``, ``kill`` and ``start``
    again keep the port and the data. Run as the ``postgres`` OS user when the tests run as
    root. ``fsync=off``: only the machine's crash, never a test's ``kill``, can lose what it
    committed."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sb-postgres-")).resolve()
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.process: subprocess.Popen[bytes] | None = None
        self._user = OS_USER if os.geteuid() == 0 else None
        if self._user is not None:
            account = pwd.getpwnam(self._user)
            os.chown(self.dir, account.pw_uid, account.pw_gid)

    def start(self, timeout: float = 30.0) -> None:
        """Start the postmaster (``initdb`` first, once) and wait until it accepts
        connections: after a ``kill``, that is once crash recovery has replayed the WAL."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"PostgreSQL on port {self.port} is already running")
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        with self.log.open("ab") as log:
            self.process = self._popen(
                [
                    str(self.bin_dir / "postgres"),
                    *("-D", str(self.data), "-p", str(self.port), "-k", str(self.dir)),
                    *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"),
                ],
                stdout=log,
            )
        eventually(
            self._accepts, timeout=timeout, what=f"PostgreSQL to accept connections on {self.port}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT: sessions ended, transactions rolled back, a checkpoint
        written), waited for; a postmaster not gone within ``timeout`` seconds is killed."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self, timeout: float = 10.0) -> None:
        """A crash: SIGKILL to the postmaster, then to every process of the cluster still
        running (backends, checkpointer, ...: orphans would go on a moment, and hold the
        shared memory a restart needs). No checkpoint, no shutdown record: the next ``start``
        recovers from the WAL, keeping exactly what was committed."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout)

        def all_gone() -> bool:
            remaining = self.pids()
            for pid in remaining:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return not remaining

        eventually(all_gone, timeout=timeout, what=f"the processes of {self.data} to end")

    def cleanup(self) -> None:
        """Kill the cluster if it runs, and remove its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, size: int = 3000) -> str:
        """The end of the server's log, for error messages."""
        try:
            return self.log.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return ""

    def _initdb(self) -> None:
        result = self._popen(
            [
                str(self.bin_dir / "initdb"),
                *("-D", str(self.data), "-U", "postgres", "--auth=trust"),
                *("--no-locale", "--encoding=UTF8", "--no-sync"),
            ],
            stdout=subprocess.PIPE,
        )
        output, _ = result.communicate(timeout=120)
        if result.returncode != 0:
            text = output.decode(errors="replace")[-3000:]
            raise RuntimeError(f"initdb exited with {result.returncode}: {text}")

    def _popen(self, args: list[str], *, stdout: int | IO[bytes]) -> subprocess.Popen[bytes]:
        """``args`` run as the cluster's OS user (``self._user``; ``None``: this one)."""
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            user=self._user,
            group=self._user,
            extra_groups=[] if self._user is not None else None,
        )

    def _accepts(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"postgres exited with {self.process.returncode}: {self.log_tail()}")
        return postgres_available(self.url, timeout=1.0) is None

    def pids(self) -> list[int]:
        """The processes running in the data directory (every PostgreSQL process changes to
        it), and the postmaster if it has not yet; zombies (no working directory) excepted."""
        found: list[int] = []
        if self.process is not None and self.process.poll() is None:
            found.append(self.process.pid)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in found:
                continue
            with suppress(OSError):
                if os.readlink(entry / "cwd") == str(self.data):
                    found.append(int(entry.name))
        return found


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started private cluster (``PostgresServer``), killed and removed on exit; without
    the binaries, ``unavailable`` (skip, or fail under CI)."""
    reason = private_server_unavailable()
    bin_dir = postgres_binaries()
    if reason is not None or bin_dir is None:
        unavailable(reason or "the PostgreSQL server binaries are not installed")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
