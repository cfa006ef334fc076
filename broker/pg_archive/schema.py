"""The archive's schema: plain SQL files in ``sql/``, applied in order at start-up.

``NNNN_name.sql`` files run once each, in the order of their number, every one in its own
transaction together with its row in ``streambroker_schema_migrations``: a migration that
fails leaves nothing behind, and the next start-up tries it again. Processes that start at
once take turns (a transaction-level advisory lock), so each file runs exactly once. A file
already applied is never run again: change the schema with a new file, never by editing one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

#: Any 64-bit number, the same in every process: the advisory lock migrations take turns on.
_LOCK = 0x5B_A5C1_1AE5

_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS streambroker_schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration shipped with the package, oldest first."""
    found = []
    for entry in resources.files(__package__).joinpath("sql").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


async def migrate(connection: asyncpg.Connection) -> list[str]:
    """Apply the migrations this database lacks; returns the names of those applied."""
    applied: list[str] = []
    for migration in migrations():
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _LOCK)
            await connection.execute(_CREATE_TABLE)
            done = await connection.fetchval(
                "SELECT 1 FROM streambroker_schema_migrations WHERE version = $1",
                migration.version,
            )
            if done:
                continue
            await connection.execute(migration.sql)
            await connection.execute(
                "INSERT INTO streambroker_schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(migration.name)
    return applied
