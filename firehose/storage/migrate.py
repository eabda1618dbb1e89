"""Numbered SQL migrations (`sql/NNN_name.sql`), applied at start-up.

* Each pending file runs in its own transaction, together with the row that records it in
  `schema_migrations`, so a crash leaves either all of a migration or none of it.
* Everything happens under a session advisory lock: several workers starting at once queue up
  and the second one finds nothing left to do.
* The sha256 of every applied file is stored; a file edited after it was applied is our own
  corrupt state, so `MigrationError` stops the worker with a message naming the file
  (DESIGN.md invariant 5). New changes go into a new numbered file.

The files are read with importlib.resources from the package `firehose.sql` (the top-level
`sql/` folder, shipped in the wheel); in a source checkout that is not installed, from `sql/`
beside the `firehose` package.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from firehose.storage import queries

# Fixed key of the session advisory lock (b"fh-migr8" as a big-endian int64): every process of
# this product that migrates a database takes the same lock.
MIGRATION_LOCK_KEY = int.from_bytes(b"fh-migr8", "big")

_FILE_RE = re.compile(r"^(\d{3,})_([A-Za-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The database's migration state does not match the shipped files; do not start."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # file name without .sql, e.g. "001_initial"
    sql: str
    checksum: str  # sha256 hex of the file's bytes


def _default_source() -> Traversable:
    try:
        return importlib.resources.files("firehose.sql")
    except ModuleNotFoundError:
        # Source checkout without `pip install`: sql/ sits beside the firehose package.
        return Path(__file__).resolve().parents[2] / "sql"


def load_migrations(source: Traversable | Path | None = None) -> list[Migration]:
    """The migration files of `source` (default: package `firehose.sql`), by version."""
    root = source if source is not None else _default_source()
    found: dict[int, Migration] = {}
    for entry in root.iterdir():
        match = _FILE_RE.match(entry.name)
        if match is None or not entry.is_file():
            continue
        data = entry.read_bytes()
        version = int(match.group(1))
        migration = Migration(
            version=version,
            name=entry.name.removesuffix(".sql"),
            sql=data.decode("utf-8"),
            checksum=hashlib.sha256(data).hexdigest(),
        )
        if version in found:
            raise MigrationError(
                f"two migration files share version {version}: "
                f"{found[version].name}.sql and {migration.name}.sql"
            )
        found[version] = migration
    if not found:
        raise MigrationError(f"no migration files found in {root}")
    return [found[v] for v in sorted(found)]


async def _applied(conn: Any) -> dict[int, tuple[str, str]]:
    """version -> (name, checksum) of the migrations recorded in the database."""
    exists = await conn.fetchval(queries.MIGRATIONS_TABLE_EXISTS)
    if not exists:
        return {}
    rows = await conn.fetch(queries.MIGRATIONS_APPLIED)
    return {r["version"]: (r["name"], r["checksum"]) for r in rows}


def _check(migrations: list[Migration], applied: dict[int, tuple[str, str]]) -> list[Migration]:
    """Raise on an edited (or renamed) applied file; return the pending migrations."""
    pending: list[Migration] = []
    for m in migrations:
        recorded = applied.get(m.version)
        if recorded is None:
            pending.append(m)
            continue
        name, checksum = recorded
        if checksum != m.checksum or name != m.name:
            raise MigrationError(
                f"migration {m.name}.sql was edited after it was applied "
                f"(database has {name}.sql with sha256 {checksum}, file has {m.checksum}); "
                "migrations are never edited once applied: restore the file and put the "
                "change in a new numbered migration"
            )
    return pending


async def pending(conn: Any, *, source: Traversable | Path | None = None) -> list[str]:
    """Names of the migrations not applied yet (readiness check: ready when empty).

    Raises `MigrationError` if an applied migration's file was edited.
    """
    return [m.name for m in _check(load_migrations(source), await _applied(conn))]


async def migrate(conn: Any, *, source: Traversable | Path | None = None) -> list[str]:
    """Apply the pending migrations in order; return the names applied (empty: up to date).

    Safe to call from several processes at once (session advisory lock). `conn` must not be
    inside a transaction: each migration commits on its own.
    """
    migrations = load_migrations(source)
    await conn.execute(queries.ADVISORY_LOCK, MIGRATION_LOCK_KEY)
    try:
        # Read the state only once we hold the lock: another process may just have migrated.
        todo = _check(migrations, await _applied(conn))
        done: list[str] = []
        for m in todo:
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(queries.MIGRATION_RECORD, m.version, m.name, m.checksum)
            done.append(m.name)
        return done
    finally:
        await conn.execute(queries.ADVISORY_UNLOCK, MIGRATION_LOCK_KEY)
