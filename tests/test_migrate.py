"""Migrations: applied by number, idempotent, checksummed, safe when started concurrently."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from firehose.storage import migrate as m
from firehose.storage.migrate import MigrationError, load_migrations, migrate, pending

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
ADVISORY_LOCKS = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
NewDatabase = Callable[..., Awaitable[str]]


async def test_template_is_migrated(conn: asyncpg.Connection) -> None:
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
    shipped = load_migrations()
    assert [(r["version"], r["name"], r["checksum"]) for r in rows] == [
        (x.version, x.name, x.checksum) for x in shipped
    ]
    assert shipped[0].name == "001_initial"
    data = (SQL_DIR / "001_initial.sql").read_bytes()
    assert shipped[0].checksum == hashlib.sha256(data).hexdigest()
    assert await pending(conn) == []


async def test_migrate_is_idempotent(conn: asyncpg.Connection) -> None:
    assert await migrate(conn) == []
    assert await migrate(conn) == []
    assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(load_migrations())


async def test_migrate_empty_database(new_database: NewDatabase) -> None:
    c = await asyncpg.connect(await new_database(migrated=False))
    try:
        assert await pending(c) == [x.name for x in load_migrations()]
        assert await migrate(c) == [x.name for x in load_migrations()]
        assert await pending(c) == []
        assert await c.fetchval("SELECT count(*) FROM records") == 0
        # The advisory lock was released.
        assert await c.fetchval(ADVISORY_LOCKS) == 0
    finally:
        await c.close()


async def test_checksum_mismatch_raises(conn: asyncpg.Connection) -> None:
    # Tamper with the recorded checksum: as if the file had been edited after it was applied.
    await conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
    with pytest.raises(MigrationError, match=r"001_initial\.sql was edited after it was applied"):
        await migrate(conn)
    with pytest.raises(MigrationError, match="edited after it was applied"):
        await pending(conn)


async def test_edited_file_raises(conn: asyncpg.Connection, tmp_path: Path) -> None:
    for f in SQL_DIR.glob("*.sql"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "001_initial.sql").write_bytes(
        (SQL_DIR / "001_initial.sql").read_bytes() + b"\n-- edited\n"
    )
    with pytest.raises(MigrationError, match=r"001_initial\.sql was edited"):
        await migrate(conn, source=tmp_path)


async def test_new_file_applied_in_order(conn: asyncpg.Connection, tmp_path: Path) -> None:
    for f in SQL_DIR.glob("*.sql"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "998_a.sql").write_text("CREATE TABLE mig_a (x int);")
    (tmp_path / "999_b.sql").write_text("INSERT INTO mig_a VALUES (1);")
    (tmp_path / "README.txt").write_text("not a migration")
    assert await pending(conn, source=tmp_path) == ["998_a", "999_b"]
    assert await migrate(conn, source=tmp_path) == ["998_a", "999_b"]
    assert await conn.fetchval("SELECT x FROM mig_a") == 1
    assert await migrate(conn, source=tmp_path) == []


async def test_failed_migration_rolls_back(conn: asyncpg.Connection, tmp_path: Path) -> None:
    for f in SQL_DIR.glob("*.sql"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "999_bad.sql").write_text("CREATE TABLE half (x int); SELECT 1/0;")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(conn, source=tmp_path)
    assert await conn.fetchval("SELECT to_regclass('half')") is None
    assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == max(
        x.version for x in load_migrations()
    )
    # The lock is released even after a failure.
    assert await conn.fetchval(ADVISORY_LOCKS) == 0


def test_duplicate_versions_rejected(tmp_path: Path) -> None:
    (tmp_path / "001_a.sql").write_text("SELECT 1;")
    (tmp_path / "001_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="share version 1"):
        load_migrations(tmp_path)


async def test_concurrent_migrate_is_safe(new_database: NewDatabase, tmp_path: Path) -> None:
    for f in SQL_DIR.glob("*.sql"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    # A slow extra migration widens the race window.
    (tmp_path / "999_slow.sql").write_text("SELECT pg_sleep(0.3); CREATE TABLE slow (x int);")
    dsn = await new_database(migrated=False)
    conns = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c, source=tmp_path) for c in conns))
        applied = sorted(results, key=len)
        assert applied[0] == [] and applied[1] == []
        assert applied[2] == [x.name for x in load_migrations(tmp_path)]
        count = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert count == len(applied[2])
        assert await conns[0].fetchval(ADVISORY_LOCKS) == 0
    finally:
        for c in conns:
            await c.close()


def test_lock_key_is_a_signed_bigint() -> None:
    assert 0 < m.MIGRATION_LOCK_KEY < 2**63
