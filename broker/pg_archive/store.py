"""The PostgreSQL archive of finished generations: what Redis held of each, byte for byte.

A generation is copied whole once it has ended (``Snapshot``: its meta hash in Redis's field
order, its text, every event as the stream entry held it), in one transaction, as often as
asked: the copy is idempotent (the row is replaced, events already there are kept), so two
archivers copying one generation at once, or a copy repeated after a crash, store it once.
The reads answer in the shapes ``GenerationLog`` gives from Redis (the raw meta hash and
text, decoded ``Event`` s), so every read path above it works the same on either.

Counters go on: an event connection to an archived generation counts in its row. The
listing pages newest first with ties by id, as Redis orders a listing.

Driver: asyncpg (a pool per process; every failure to reach PostgreSQL or of a query is
``ArchiveUnavailable``, which readers get as the retryable 503 Redis trouble gives).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.errors import ArchiveRefused, ArchiveUnavailable, ConfigError, GenerationNotFound
from broker.events import Event
from broker.keys import STORE_LOCAL_FIELDS, MetaField
from broker.pg_archive.schema import migrate

if TYPE_CHECKING:
    from broker.settings import ArchiveSettings

logger = logging.getLogger("streambroker.archive")

#: Connections of one process's pool: reads of archived generations and the archiver share it.
POOL_SIZE = 8
#: Longest wait for a connection or a query before it counts as PostgreSQL being away.
TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Snapshot:
    """One finished generation as Redis held it, read in one step."""

    stream_id: str
    #: The meta hash as stored (Redis's field order).
    meta: dict[bytes, bytes]
    text: bytes
    #: ``(seq, payload)`` of every event, 1..last_seq, the payload as the entry held it.
    events: list[tuple[int, bytes]]

    @property
    def last_seq(self) -> int:
        return int(self.meta.get(MetaField.LAST_SEQ.encode(), b"0"))

    def counter(self, name: str) -> int:
        return int(self.meta.get(name.encode(), b"0"))


@dataclass(frozen=True)
class ArchivedRow:
    """A listing's view of an archived generation."""

    stream_id: str
    created_at_ms: int
    meta: dict[bytes, bytes]


def _meta_json(meta: dict[bytes, bytes]) -> str:
    """The meta hash as a JSON object of strings, in order, less the store-local fields and
    the counters (kept in their own columns, where they go on counting)."""
    fields = {
        name: value.decode()
        for key, value in meta.items()
        if (name := key.decode()) not in STORE_LOCAL_FIELDS
    }
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)


def _meta_hash(meta_json: str, connections: int, resumes: int) -> dict[bytes, bytes]:
    """``_meta_json`` back into the hash Redis held, with the counters as they stand now (in
    their field's place; appended, as ``HINCRBY`` would, when it was not there yet)."""
    fields: dict[str, str] = json.loads(meta_json)
    for name, value in ((MetaField.CONNECTIONS, connections), (MetaField.RESUMES, resumes)):
        if value or name in fields:
            fields[name] = str(value)
    return {k.encode(): v.encode() for k, v in fields.items()}


@contextlib.contextmanager
def _archive_errors() -> Iterator[None]:
    """asyncpg's and the network's failures as ``ArchiveUnavailable``; data PostgreSQL
    cannot hold as ``ArchiveRefused``."""
    import asyncpg

    try:
        yield
    except asyncpg.DataError as exc:
        raise ArchiveRefused(f"{type(exc).__name__}: {_one_line(exc)}") from exc
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        detail = _one_line(exc) if str(exc) else f"no answer within {TIMEOUT_SECONDS:g} s"
        raise ArchiveUnavailable(f"the archive failed: {type(exc).__name__}: {detail}") from exc


class ArchiveStore:
    def __init__(self, pool: Any, *, retention_seconds: int = 0) -> None:
        self._pool = pool
        #: ``BROKER_ARCHIVE_RETENTION_SECONDS``: how long a generation is kept (0: for good).
        self.retention_seconds = retention_seconds

    @classmethod
    async def connect(
        cls, url: str, *, pool_size: int = POOL_SIZE, retention_seconds: int = 0
    ) -> ArchiveStore:
        """A pool on ``url``, with the schema brought up to date (``schema.migrate``).

        ``ConfigError`` (one line, naming ``BROKER_ARCHIVE_URL``, never the password) when
        the database cannot be reached or refuses us: a process configured to archive does
        not start without its archive."""
        import asyncpg

        unreachable = (
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            ValueError,
        )
        pool = None
        try:
            # min_size=0: an idle pool holds no connection it would have to restore (and log
            # about) every second while PostgreSQL is away.
            pool = await asyncpg.create_pool(
                url,
                min_size=0,
                max_size=pool_size,
                timeout=TIMEOUT_SECONDS,
                command_timeout=TIMEOUT_SECONDS,
            )
            connection = await pool.acquire(timeout=TIMEOUT_SECONDS)
        except unreachable as exc:
            if pool is not None:
                await pool.close()
            raise ConfigError(
                f"BROKER_ARCHIVE_URL: cannot connect to the archive database "
                f"({type(exc).__name__}: {_one_line(exc)})"
            ) from None
        try:
            applied = await migrate(connection)
        except unreachable as exc:
            await pool.release(connection)
            await pool.close()
            raise ConfigError(
                f"BROKER_ARCHIVE_URL: could not bring the archive's schema up to date "
                f"({type(exc).__name__}: {_one_line(exc)})"
            ) from None
        await pool.release(connection)
        for name in applied:
            logger.info("archive schema: applied %s", name)
        return cls(pool, retention_seconds=retention_seconds)

    async def close(self) -> None:
        await self._pool.close()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        with _archive_errors():
            async with self._pool.acquire(timeout=TIMEOUT_SECONDS) as connection:
                yield connection

    # ------------------------------------------------------------------------- writes

    async def store(self, snapshot: Snapshot) -> None:
        """Copy ``snapshot`` in one transaction; idempotent. The row is replaced (a later
        snapshot's meta and counters win); events already stored are kept as they are (a
        finished generation's events never change)."""
        meta = snapshot.meta
        tenant = meta.get(MetaField.TENANT.encode(), b"").decode()
        status = meta[MetaField.STATUS.encode()].decode()
        created = int(meta[MetaField.CREATED_AT_MS.encode()])
        async with self._connection() as connection, connection.transaction():
            await connection.execute(
                """
                INSERT INTO streambroker_generations AS g
                    (id, tenant, status, created_at_ms, last_seq, meta,
                     connections, resumes, text)
                VALUES ($1, $2, $3, $4, $5, $6::json, $7, $8, $9)
                ON CONFLICT (id) DO UPDATE SET
                    status = EXCLUDED.status, last_seq = EXCLUDED.last_seq,
                    meta = EXCLUDED.meta, text = EXCLUDED.text,
                    connections = GREATEST(g.connections, EXCLUDED.connections),
                    resumes = GREATEST(g.resumes, EXCLUDED.resumes)
                """,
                snapshot.stream_id,
                tenant,
                status,
                created,
                snapshot.last_seq,
                _meta_json(meta),
                snapshot.counter(MetaField.CONNECTIONS),
                snapshot.counter(MetaField.RESUMES),
                snapshot.text,
            )
            if snapshot.events:
                await connection.execute(
                    """
                    INSERT INTO streambroker_events (stream_id, seq, payload)
                    SELECT $1, seq, payload FROM unnest($2::integer[], $3::bytea[])
                        AS e (seq, payload)
                    ON CONFLICT (stream_id, seq) DO NOTHING
                    """,
                    snapshot.stream_id,
                    [seq for seq, _ in snapshot.events],
                    [payload for _, payload in snapshot.events],
                )

    async def refresh(self, stream_id: str, meta: dict[bytes, bytes]) -> bool:
        """Bring an archived generation's meta hash and counters up to ``meta`` (what Redis
        holds just before its keys are deleted); False when the archive no longer holds it
        (its retention deleted it meanwhile): then it must be copied whole again."""
        async with self._connection() as connection:
            updated = await connection.fetchval(
                """
                UPDATE streambroker_generations SET
                    meta = $2::json,
                    connections = GREATEST(connections, $3),
                    resumes = GREATEST(resumes, $4)
                WHERE id = $1
                RETURNING 1
                """,
                stream_id,
                _meta_json(meta),
                int(meta.get(MetaField.CONNECTIONS.encode(), b"0")),
                int(meta.get(MetaField.RESUMES.encode(), b"0")),
            )
        return updated is not None

    async def delete_archived_before(self, cutoff_seconds: int, *, limit: int = 500) -> int:
        """Delete up to ``limit`` generations archived more than ``cutoff_seconds`` ago
        (``BROKER_ARCHIVE_RETENTION_SECONDS``), their events with them; returns how many."""
        async with self._connection() as connection:
            deleted = await connection.fetchval(
                """
                WITH gone AS (
                    DELETE FROM streambroker_generations WHERE id IN (
                        SELECT id FROM streambroker_generations
                        WHERE archived_at < now() - make_interval(secs => $1)
                        ORDER BY archived_at LIMIT $2)
                    RETURNING 1)
                SELECT count(*) FROM gone
                """,
                float(cutoff_seconds),
                limit,
            )
        return int(deleted)

    # -------------------------------------------------------------------------- reads

    async def get_raw(
        self, stream_id: str, *, tenant: str | None = None
    ) -> tuple[dict[bytes, bytes], bytes]:
        """The meta hash and text as Redis held them; ``GenerationNotFound`` (also for
        another tenant's, with ``tenant``)."""
        async with self._connection() as connection:
            row = await connection.fetchrow(
                "SELECT tenant, meta::text AS meta, connections, resumes, text "
                "FROM streambroker_generations WHERE id = $1",
                stream_id,
            )
        return self._found(stream_id, row, tenant)

    async def open_watch(
        self, stream_id: str, *, resumed: bool, tenant: str | None = None
    ) -> tuple[dict[bytes, bytes], bytes]:
        """``get_raw`` for a client opening the events: counts the connection (and the
        resume) in the same statement, as Redis's ``OPEN_WATCH`` does."""
        async with self._connection() as connection:
            row = await connection.fetchrow(
                """
                UPDATE streambroker_generations
                SET connections = connections + 1, resumes = resumes + $2
                WHERE id = $1 AND ($3::text IS NULL OR tenant = $3)
                RETURNING tenant, meta::text AS meta, connections, resumes, text
                """,
                stream_id,
                int(resumed),
                tenant or None,
            )
        return self._found(stream_id, row, tenant)

    @staticmethod
    def _found(stream_id: str, row: Any, tenant: str | None) -> tuple[dict[bytes, bytes], bytes]:
        if row is None or (tenant and row["tenant"] != tenant):
            raise GenerationNotFound(stream_id)
        return _meta_hash(row["meta"], row["connections"], row["resumes"]), bytes(row["text"])

    async def holds(self, stream_id: str) -> bool:
        async with self._connection() as connection:
            found = await connection.fetchval(
                "SELECT 1 FROM streambroker_generations WHERE id = $1", stream_id
            )
        return found is not None

    async def read(self, stream_id: str, after_seq: int, *, count: int = 512) -> list[Event]:
        """Events with ``seq > after_seq``, oldest first, at most ``count``."""
        async with self._connection() as connection:
            rows = await connection.fetch(
                "SELECT seq, payload FROM streambroker_events "
                "WHERE stream_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                stream_id,
                after_seq,
                count,
            )
        return [Event.decode(bytes(row["payload"]), row["seq"]) for row in rows]

    async def page(
        self,
        *,
        tenant: str | None,
        limit: int,
        before: tuple[int, str] | None = None,
        created_after_ms: int | None = None,
        created_before_ms: int | None = None,
    ) -> list[ArchivedRow]:
        """Up to ``limit`` archived generations, newest first (ties: higher id first),
        strictly older than ``before`` = ``(created_at_ms, id)``, created in
        ``[created_after_ms, created_before_ms)``; with ``tenant``, that tenant's only."""
        async with self._connection() as connection:
            rows = await connection.fetch(
                """
                SELECT id, created_at_ms, meta::text AS meta, connections, resumes
                FROM streambroker_generations
                WHERE ($1::text IS NULL OR tenant = $1)
                  AND ($2::bigint IS NULL OR (created_at_ms, id) < ($2, $3::text COLLATE "C"))
                  AND ($4::bigint IS NULL OR created_at_ms >= $4)
                  AND ($5::bigint IS NULL OR created_at_ms < $5)
                ORDER BY created_at_ms DESC, id DESC
                LIMIT $6
                """,
                tenant,
                before[0] if before else None,
                before[1] if before else None,
                created_after_ms,
                created_before_ms,
                limit,
            )
        return [
            ArchivedRow(
                row["id"],
                row["created_at_ms"],
                _meta_hash(row["meta"], row["connections"], row["resumes"]),
            )
            for row in rows
        ]

    async def count(self) -> int:
        async with self._connection() as connection:
            return int(await connection.fetchval("SELECT count(*) FROM streambroker_generations"))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def connect_archive(settings: ArchiveSettings) -> ArchiveStore:
    """The archive of a process configured with ``settings`` (``BROKER_ARCHIVE_URL`` set)."""
    assert settings.archive_url is not None
    return await ArchiveStore.connect(
        settings.archive_url, retention_seconds=settings.archive_retention_seconds
    )


async def check_archive(url: str) -> None:
    """Reach the archive and bring its schema up to date, then let go: what every serving
    command does first, so a wrong URL or a database that is down stops it in one line."""
    store = await ArchiveStore.connect(url, pool_size=1)
    await store.close()
